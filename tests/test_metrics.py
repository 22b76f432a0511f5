import numpy as np
import pytest

from labelshift.metrics import ConfusionMatrix


def test_miou_on_hand_computed_fixture():
    # 3 classes; 255 ignored. Pixels (label, pred):
    labels = np.array([[0, 0, 1, 1], [2, 2, 255, 0]])
    preds = np.array([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm = ConfusionMatrix(3)
    cm.update(labels, preds)
    # matrix rows=true: class0: (0->0)x2, (0->1)x1 ; class1: (1->1)x2 ; class2: (2->2)x1, (2->0)x1
    assert cm.matrix.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 1]]
    # IoU0 = 2 / (3 + 3 - 2) = 0.5 ; IoU1 = 2 / (2 + 3 - 2) = 2/3 ; IoU2 = 1 / (2 + 1 - 1) = 0.5
    np.testing.assert_allclose(cm.iou(), [0.5, 2 / 3, 0.5])
    assert cm.miou() == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert cm.miou(subset=[0, 2]) == pytest.approx(0.5)
    assert cm.pixel_accuracy() == pytest.approx(5 / 7)


def test_absent_class_is_nan_and_left_out_of_the_mean():
    cm = ConfusionMatrix(4)
    cm.update(np.array([0, 1, 1]), np.array([0, 1, 0]))
    ious = cm.iou()
    assert np.isnan(ious[2]) and np.isnan(ious[3])
    assert cm.miou() == pytest.approx((0.5 + 0.5) / 2)
    summary = cm.to_dict(["a", "b", "c", "d"])
    assert summary["per_class_iou"]["c"] is None and summary["miou"] == pytest.approx(50.0)


def test_merge_equals_one_matrix_over_the_whole_split():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=(6, 8, 8))
    labels[:, 0] = 255
    preds = rng.integers(0, 5, size=(6, 8, 8))
    whole = ConfusionMatrix(5)
    whole.update(labels, preds)
    a, b = ConfusionMatrix(5), ConfusionMatrix(5)
    a.update(labels[:3], preds[:3])
    b.update(labels[3:], preds[3:])
    assert (a.merge(b).matrix == whole.matrix).all()
    # mIoU from the summed matrix differs from the mean of per-image mIoUs
    per_image = []
    for i in range(6):
        one = ConfusionMatrix(5)
        one.update(labels[i], preds[i])
        per_image.append(one.miou())
    assert whole.miou() != pytest.approx(float(np.mean(per_image)), abs=1e-6)


def test_shape_and_class_count_mismatch_raise():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"labels \(4,\) and predictions \(3,\) differ"):
        cm.update(np.zeros(4, int), np.zeros(3, int))
    with pytest.raises(ValueError, match="cannot merge confusion matrices of 3 and 4 classes"):
        cm.merge(ConfusionMatrix(4))


def test_out_of_range_labels_and_predictions_raise():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"labels \[3, 7\] are neither classes 0..2 nor the ignore index 255"):
        cm.update(np.array([0, 3, 7, 255]), np.array([0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"predictions \[255\] are not classes 0..2"):
        cm.update(np.array([0, 1]), np.array([0, 255]))
    assert cm.matrix.sum() == 0  # nothing was counted by the rejected updates
