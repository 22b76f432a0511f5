"""FADA's class-balanced source sampler, which the reference's Classifier Refinement trains with.

FADA (``core/datasets/gta5.py`` and ``synthia.py``: the dataset's ``max_iters`` branch, with the per-image class
lists of ``gtav_label_info.p`` / ``synthia_label_info.p``) draws blocks of 3000 images. Before each draw it
weights class c by ``1 / log(1.01 + d_c)``, where d is the share of the classes counted so far in the block
(every class of every image drawn counts once), picks a class with those weights, and takes the next image of
that class's list (the list is reshuffled when it runs out). Rare classes are drawn until they are as common as
the others, as counted by images.

:func:`fada_draws` is that rule; :class:`ClassBalancedBatchSampler` serves its draws as global batches with the
interface of :class:`~labelshift.train.loop.GlobalBatchSampler` (seeded per block, resumable mid-block; the
block's draws are permuted as the reference's DistributedSampler permutes its list). Two departures, both
only where the reference would crash: a class no image contains gets weight 0 (the reference indexes an empty
list), and a class in a single image keeps drawing it (the reference divides by zero).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

DRAWS_PER_BLOCK = 3000  # FADA's SUB_EPOCH_SIZE
WEIGHT_OFFSET = 1.0 + 1e-2  # w_c = 1 / log(1 + 1e-2 + d_c)


def images_of_classes(image_classes: Sequence[Sequence[int]], num_classes: int) -> list[list[int]]:
    """FADA's ``label_to_file``: for each class, the indices of the images that contain it (in image order)."""
    members: list[list[int]] = [[] for _ in range(num_classes)]
    for image, classes in enumerate(image_classes):
        for class_id in classes:
            members[int(class_id)].append(image)
    return members


def fada_draws(image_classes: Sequence[Sequence[int]], num_classes: int, num_draws: int,
               rng: np.random.RandomState) -> list[int]:
    """``num_draws`` image indices by FADA's class-balanced rule (one block: the class counts start at 0).

    ``image_classes``: for each image, the ids of the classes present in its label (FADA's ``file_to_label``).
    ``rng``: a legacy ``RandomState``, used exactly as the reference uses ``np.random`` (``choice`` with weights,
    ``shuffle`` of a class's list), so the same seed gives the reference's sequence.
    """
    members = images_of_classes(image_classes, num_classes)
    drawable = np.array([len(m) > 0 for m in members])
    if not drawable.any():
        raise ValueError("no image contains any class: nothing to draw")
    position = [0] * num_classes
    class_counts = np.zeros(num_classes)
    draws: list[int] = []
    for _ in range(num_draws):
        shares = class_counts / class_counts.sum() if class_counts.sum() else class_counts.copy()
        weights = np.where(drawable, 1.0 / np.log(WEIGHT_OFFSET + shares), 0.0)
        class_id = rng.choice(num_classes, p=weights / weights.sum())
        images = members[class_id]
        if position[class_id] > len(images) - 1:
            rng.shuffle(images)
            position[class_id] = position[class_id] % (len(images) - 1) if len(images) > 1 else 0
        image = images[position[class_id]]
        draws.append(image)
        position[class_id] += 1
        class_counts[list(image_classes[image])] += 1
    return draws


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Global batches of FADA's class-balanced draws; rank r takes its contiguous share of each batch.

    An epoch is one block of ``draws_per_block`` draws (``draws_per_block // global_batch`` steps), seeded by
    ``[seed, epoch]``; like :class:`~labelshift.train.loop.GlobalBatchSampler` the union over ranks of a step is
    the same for any number of workers, and ``set_position`` resumes mid-epoch.
    """

    def __init__(self, image_classes: Sequence[Sequence[int]], num_classes: int, global_batch: int, rank: int,
                 world_size: int, seed: int, draws_per_block: int = DRAWS_PER_BLOCK) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} workers")
        if draws_per_block < global_batch:
            raise ValueError(f"a block of {draws_per_block} draws is smaller than the global batch {global_batch}")
        self.image_classes = [list(classes) for classes in image_classes]
        self.num_classes, self.global_batch = num_classes, global_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.per_rank = global_batch // world_size
        self.draws_per_block = draws_per_block
        self.epoch, self.offset = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.draws_per_block // self.global_batch

    def set_position(self, epoch: int, offset: int = 0) -> None:
        self.epoch, self.offset = epoch, offset

    def __len__(self) -> int:
        return self.steps_per_epoch - self.offset

    def block(self, epoch: int) -> np.ndarray:
        """The image indices of epoch ``epoch``, in the order they are served: (steps_per_epoch * global_batch,)."""
        count = self.steps_per_epoch * self.global_batch
        draws = fada_draws(self.image_classes, self.num_classes, count, np.random.RandomState([self.seed, epoch]))
        return np.random.default_rng([self.seed, epoch]).permutation(np.asarray(draws))

    def __iter__(self) -> Iterator[list[int]]:
        order = self.block(self.epoch)
        for step in range(self.offset, self.steps_per_epoch):
            start = step * self.global_batch + self.rank * self.per_rank
            yield order[start:start + self.per_rank].tolist()


def classes_present(dataset, num_workers: int = 0) -> list[list[int]]:
    """For each image of a labelled dataset, the trainIds present in its label (decoded without the images)."""
    from labelshift.classes import IGNORE_INDEX
    from labelshift.data.io import LabelMaps

    present = []
    for batch in DataLoader(LabelMaps(dataset), batch_size=1, num_workers=num_workers):
        ids = torch.unique(batch["label"]).tolist()
        present.append([int(i) for i in ids if i != IGNORE_INDEX])
    return present
