"""The embedded world: a deterministic synthetic GTA5 (or SYNTHIA) -> Cityscapes pair with a strong label shift.

``generate_world(out_dir)`` writes, in the real on-disk layouts (so the GTA5 and Cityscapes loaders read it)::

    out_dir/gta5/images/NNNNN.png                 RGB source images (stems 00001, 00002, ...)
    out_dir/gta5/labels/NNNNN.png                 8-bit palette PNGs of Cityscapes LABEL ids (0 = unlabelled)
    out_dir/gta5/splits/{train,val}.txt           source stems; val is a labelled held-out split
    out_dir/cityscapes/leftImg8bit/{train,val}/<city>/<city>_NNNNNN_000019_leftImg8bit.png
    out_dir/cityscapes/gtFine/{train,val}/<city>/<city>_NNNNNN_000019_gtFine_labelIds.png
    out_dir/cityscapes/splits/{adapt,select}.txt  target-train stems: select (``target_select_fraction``) is the
                                                  labelled selection split of sweeps, adapt the rest
    out_dir/world.json                            knobs, and the exact class statistics of every split

With ``source_layout="synthia"`` the source is SYNTHIA RAND_CITYSCAPES instead, with the 16 SYNTHIA classes
(no terrain, truck or train in the source; the target drops them too, so the pair has one class set)::

    out_dir/synthia/RGB/NNNNNNN.png               RGB source images (stems 0000001, ...)
    out_dir/synthia/GT/LABELS/NNNNNNN.png         16-bit 3-channel PNGs, the SYNTHIA class id in the first (R)
                                                  channel (0 = void), the others 0
    out_dir/synthia/splits/{train,val}.txt

Class presence: each image flags every class independently, with the per-domain presence rate derived at run
time from the published statistics (``labelshift.classes.reference_statistics()``): GTA5 reference-rule image
counts / number of GTA5 images for the source, the Cityscapes estimates (GTA5 DeepLabV2 model) / 2975 for the
target (with the SYNTHIA layout: the SYNTHIA counts and the estimates of the SYNTHIA DeepLabV2 model). Two deliberate departures, both documented in ``docs/world.md``: every rate is floored at
``presence_floor`` (so the rarest source classes still have a few dozen training images), and the target
*sky* rate is the source's (the published 239/2975 is a slip of the reference rule; Cityscapes has sky in most
images). ``label_shift`` interpolates the target rates between the source's (0) and the Cityscapes ones (1).

Appearance: see :mod:`labelshift.data.world_scene`. The target domain renders with a larger spread of object
colours, a colour cast, a blur and extra noise (``target_*`` knobs; all at their no-shift values = same camera).

Every file is a pure function of the arguments (one random generator per image, seeded by
``[seed, domain, index]``): the same arguments give the same bytes. The tree is built in a temporary sibling
directory and renamed into place, so ``out_dir`` is either absent, complete, or the previous world.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from labelshift.classes import IGNORE_INDEX, cityscapes19, reference_statistics, synthia16
from labelshift.data.io import write_palette_png, write_png_atomic
from labelshift.world_knobs import WorldKnobs, make_knobs
from labelshift.data.world_scene import NUM_CLASSES, SKY, SceneStyle, render_scene

GENERATOR_VERSION = 2
TRAIN_CITIES: tuple[str, ...] = ("aachen", "bremen")
VAL_CITIES: tuple[str, ...] = ("frankfurt", "lindau")
SPLITS: tuple[str, ...] = ("source_train", "source_val", "target_train", "target_val")
_DOMAIN_CODES = {"source": 1, "target_train": 2, "target_val": 3}
# The target camera's colour cast at target_color_cast = 1: bluer, less red, slightly lifted blacks.
TARGET_COLOR_GAIN_DELTA: tuple[float, float, float] = (-0.04, 0.0, 0.04)
TARGET_COLOR_OFFSET: tuple[float, float, float] = (4.0, 4.0, 0.0)


def _published_rates(source_layout: str) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) published presence rates in ``cityscapes19`` order; classes a SYNTHIA source lacks: 0."""
    stats = reference_statistics()
    if source_layout == "gta5":
        source = np.asarray(stats["gta5_source_image_counts_19"], dtype=np.float64) / stats["gta5_num_images"]
        target = (np.asarray(stats["cityscapes_estimated_counts_from_gta5_deeplabv2_19"], dtype=np.float64)
                  / stats["cityscapes_train_num_images"])
        return source, target
    columns = cityscapes19().subset_indices(synthia16().names)
    source, target = np.zeros(NUM_CLASSES), np.zeros(NUM_CLASSES)
    source[columns] = np.asarray(stats["synthia_source_image_counts_16"], dtype=np.float64) / stats["synthia_num_images"]
    target[columns] = (np.asarray(stats["cityscapes_estimated_counts_from_synthia_deeplabv2_16"], dtype=np.float64)
                       / stats["cityscapes_train_num_images"])
    return source, target


def presence_rates(presence_floor: float, label_shift: float, source_layout: str = "gta5") -> dict[str, np.ndarray]:
    """Per-class image-presence probabilities of the two domains, (K,) float64 each (``cityscapes19`` order).

    ``source``: the reference-rule image counts / images of the source (GTA5, or SYNTHIA for
    ``source_layout="synthia"``). ``target``: the Cityscapes estimates of that source's DeepLabV2 model /
    Cityscapes train images, with sky set to the source rate, moved towards the source by ``1 - label_shift``.
    Both floored at ``presence_floor``, except the classes a SYNTHIA source lacks (terrain, truck, train: 0).
    """
    source, target = _published_rates(source_layout)
    target[SKY] = source[SKY]
    target = source + label_shift * (target - source)
    absent = source == 0
    return {"source": np.where(absent, 0.0, np.maximum(source, presence_floor)),
            "target": np.where(absent, 0.0, np.maximum(target, presence_floor))}


def domain_styles(knobs: WorldKnobs) -> dict[str, SceneStyle]:
    """The source camera (plain) and the target camera (colour cast, blur, extra noise)."""
    cast = knobs.target_color_cast
    return {
        "source": SceneStyle(class_separation=knobs.class_separation, instance_color_std=knobs.instance_color_std,
                             pixel_noise_std=knobs.pixel_noise_std),
        "target": SceneStyle(
            class_separation=knobs.class_separation, instance_color_std=knobs.target_instance_color_std,
            pixel_noise_std=float(np.hypot(knobs.pixel_noise_std, knobs.target_extra_noise_std)),
            color_gain=tuple(1.0 + cast * d for d in TARGET_COLOR_GAIN_DELTA),
            color_offset=tuple(cast * o for o in TARGET_COLOR_OFFSET),
            blur_sigma=knobs.target_blur_sigma),
    }


class _SplitStats:
    """Exact per-class pixel counts and image-presence counts of one split."""

    def __init__(self) -> None:
        self.pixel_counts = np.zeros(NUM_CLASSES, dtype=np.int64)
        self.image_counts = np.zeros(NUM_CLASSES, dtype=np.int64)
        self.num_images = 0
        self.num_void_pixels = 0

    def update(self, train_ids: np.ndarray) -> None:
        """train_ids: (H, W) uint8, 255 = void."""
        counts = np.bincount(train_ids.reshape(-1), minlength=256)
        self.pixel_counts += counts[:NUM_CLASSES]
        self.image_counts += counts[:NUM_CLASSES] > 0
        self.num_void_pixels += int(counts[IGNORE_INDEX])
        self.num_images += 1

    def to_dict(self) -> dict:
        pixels = int(self.pixel_counts.sum())
        return {
            "num_images": self.num_images,
            "num_pixels": pixels,
            "num_void_pixels": self.num_void_pixels,
            "pixel_counts": self.pixel_counts.tolist(),
            "image_counts": self.image_counts.tolist(),
            "pixel_prior": _normalise(self.pixel_counts),
            "image_prior": _normalise(self.image_counts),
            "presence_rate": [round(float(c) / max(self.num_images, 1), 8) for c in self.image_counts],
        }


def _normalise(counts: np.ndarray) -> list[float]:
    total = counts.sum()
    return [round(float(c) / total, 10) if total else 0.0 for c in counts]


def _id_palette() -> np.ndarray:
    """(256, 3) uint8: the Cityscapes colour of each label id (black elsewhere), as GTA5 label files carry."""
    classes = cityscapes19()
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[list(classes.label_ids)] = np.asarray(classes.palette, dtype=np.uint8)
    return palette


def _label_id_lut() -> np.ndarray:
    """(256,) uint8: trainId -> Cityscapes label id (void 255 -> 0 'unlabeled')."""
    lut = np.zeros(256, dtype=np.uint8)
    lut[:NUM_CLASSES] = cityscapes19().label_ids
    return lut


def _render(knobs: WorldKnobs, domain: str, index: int, rates: np.ndarray,
            style: SceneStyle) -> tuple[np.ndarray, np.ndarray]:
    """Image (H, W, 3) uint8 and trainIds (H, W) uint8 of image ``index`` of ``domain``."""
    rng = np.random.default_rng([knobs.seed, _DOMAIN_CODES[domain], index])
    present = rng.random(NUM_CLASSES) < rates
    return render_scene(rng, present, knobs.size, style)


def _source_val_indices(knobs: WorldKnobs) -> set[int]:
    n_val = round(knobs.num_source * knobs.source_val_fraction)
    if knobs.source_val_fraction > 0:
        n_val = max(n_val, 1)
    n_val = min(n_val, knobs.num_source - 1)
    order = np.random.default_rng([knobs.seed, 99]).permutation(knobs.num_source)
    return set(order[:n_val].tolist())


def _synthia_id_lut() -> np.ndarray:
    """(256,) uint16: ``cityscapes19`` trainId -> SYNTHIA RAND_CITYSCAPES class id (void and the classes SYNTHIA
    lacks -> 0, SYNTHIA's void), the inverse of the published SYNTHIA map."""
    synthia_train_ids = cityscapes19().subset_indices(synthia16().names)
    lut = np.zeros(256, dtype=np.uint16)
    for label_id, train_id16 in reference_statistics()["synthia_label_id_to_train_id_16"].items():
        lut[synthia_train_ids[train_id16]] = int(label_id)
    return lut


def _source_files(layout: str) -> tuple[str, str, int, Any]:
    """(image dir, label dir, stem digits, label writer(path, train_ids)) of a source layout."""
    if layout == "synthia":
        lut = _synthia_id_lut()

        def write_synthia_label(path: Path, train_ids: np.ndarray) -> None:
            ids = lut[train_ids]
            write_png_atomic(path, np.stack([ids, np.zeros_like(ids), np.zeros_like(ids)], axis=-1))

        return "RGB", "GT/LABELS", 7, write_synthia_label
    lut, palette = _label_id_lut(), _id_palette()
    return "images", "labels", 5, lambda path, train_ids: write_palette_png(path, lut[train_ids], palette)


def _write_source(root: Path, knobs: WorldKnobs, rates: np.ndarray, style: SceneStyle,
                  stats: dict[str, _SplitStats]) -> None:
    """The source layout under ``root`` (GTA5: images + palette PNGs of label ids; SYNTHIA: RGB + 16-bit
    GT/LABELS), and splits/{train,val}.txt."""
    image_dir, label_dir, digits, write_label = _source_files(knobs.source_layout)
    val_indices = _source_val_indices(knobs)
    stems: dict[str, list[str]] = {"train": [], "val": []}
    for index in range(knobs.num_source):
        image, train_ids = _render(knobs, "source", index, rates, style)
        stem = f"{index + 1:0{digits}d}"
        write_png_atomic(root / image_dir / f"{stem}.png", image)
        write_label(root / label_dir / f"{stem}.png", train_ids)
        split = "val" if index in val_indices else "train"
        stems[split].append(stem)
        stats[f"source_{split}"].update(train_ids)
    (root / "splits").mkdir(parents=True, exist_ok=True)
    for split, names in stems.items():
        (root / "splits" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))


def _write_target(root: Path, knobs: WorldKnobs, rates: np.ndarray, style: SceneStyle,
                  stats: dict[str, _SplitStats]) -> dict[str, list[str]]:
    """Cityscapes layout under ``root`` (train and val splits); returns the cities of each split."""
    lut = _label_id_lut()
    plan = {"train": (knobs.num_target_train, TRAIN_CITIES), "val": (knobs.num_target_val, VAL_CITIES)}
    train_stems: list[str] = []
    for split, (count, cities) in plan.items():
        for index in range(count):
            image, train_ids = _render(knobs, f"target_{split}", index, rates, style)
            city = cities[index * len(cities) // count]
            stem = f"{city}_{index:06d}_000019"
            write_png_atomic(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", image)
            write_png_atomic(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", lut[train_ids])
            stats[f"target_{split}"].update(train_ids)
            if split == "train":
                train_stems.append(stem)
    _write_selection_lists(root / "splits", train_stems, knobs)
    return {split: list(cities) for split, (_, cities) in plan.items()}


def _write_selection_lists(splits_dir: Path, train_stems: list[str], knobs: WorldKnobs) -> None:
    """``select.txt``: a seeded ``target_select_fraction`` of target train (at most all but one image), the
    labelled held-out split sweeps select settings on; ``adapt.txt``: the rest, the unlabelled pool to adapt on
    (estimate the prior, pseudo-label) when a config keeps the two apart."""
    n_select = min(round(len(train_stems) * knobs.target_select_fraction), len(train_stems) - 1)
    chosen = set(np.random.default_rng([knobs.seed, 98]).permutation(len(train_stems))[:n_select].tolist())
    splits_dir.mkdir(parents=True, exist_ok=True)
    for name, selected in (("select", True), ("adapt", False)):
        stems = [stem for index, stem in enumerate(train_stems) if (index in chosen) == selected]
        (splits_dir / f"{name}.txt").write_text("".join(f"{stem}\n" for stem in stems))


def _knobs_json(knobs: WorldKnobs) -> dict:
    return json.loads(json.dumps(asdict(knobs)))


def _build(tree: Path, knobs: WorldKnobs) -> dict:
    """Write the whole world under ``tree`` (world.json last) and return its manifest."""
    rates, styles = presence_rates(knobs.presence_floor, knobs.label_shift, knobs.source_layout), domain_styles(knobs)
    stats = {split: _SplitStats() for split in SPLITS}
    _write_source(tree / knobs.source_layout, knobs, rates["source"], styles["source"], stats)
    cities = _write_target(tree / "cityscapes", knobs, rates["target"], styles["target"], stats)
    manifest = {
        "generator": "labelshift.data.world",
        "version": GENERATOR_VERSION,
        "seed": knobs.seed,
        "size": list(knobs.size),
        "knobs": _knobs_json(knobs),
        "classes": list(cityscapes19().names),
        "label_ids": list(cityscapes19().label_ids),
        "layout": {
            "source": {"kind": knobs.source_layout, "root": knobs.source_layout, "train_list": "splits/train.txt",
                       "val_list": "splits/val.txt"},
            "target": {"kind": "cityscapes", "root": "cityscapes", "cities": cities,
                       "select_list": "splits/select.txt", "adapt_list": "splits/adapt.txt"},
        },
        "design_presence_rate": {domain: [round(float(r), 8) for r in values] for domain, values in rates.items()},
        "splits": {split: stats[split].to_dict() for split in SPLITS},
    }
    payload = json.dumps(manifest, indent=1) + "\n"
    (tree / "world.json").write_text(payload)
    return manifest


def read_world_manifest(out_dir: str | os.PathLike) -> dict | None:
    """The ``world.json`` of a complete world under ``out_dir``, or ``None`` when there is none."""
    path = Path(out_dir) / "world.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def generate_world(out_dir: str | os.PathLike, *, overwrite: bool = False, **knobs: Any) -> dict:
    """Write the embedded world under ``out_dir`` and return its manifest (the content of ``world.json``).

    Keyword arguments (the fields of :class:`WorldKnobs`; unset ones take its defaults):
        size: (width, height) of every image.
        seed: the world seed; with the other arguments it fixes every byte written.
        num_source: GTA5-layout images; ``source_val_fraction`` of them (at least one) form the source val split.
        num_target_train, num_target_val: Cityscapes-layout images of the train and val splits.
        presence_floor: lower bound of every class's per-image presence probability, in both domains.
        label_shift: 0 = the target uses the source presence rates, 1 = the published Cityscapes estimates.
        class_separation: colour distance between class means inside a confusable group (smaller = harder).
        instance_color_std: per-channel spread of an object's colour around its class mean.
        pixel_noise_std: per-pixel noise of the source camera (the target adds more).
        target_instance_color_std: ``instance_color_std`` of the target (objects vary more in colour there).
        target_color_cast: strength of the target camera's colour cast (0 = none, 1 = gains 0.96/1/1.04 + offset).
        target_blur_sigma: Gaussian blur of the target camera, in pixels of a 128-pixel-high image.
        target_extra_noise_std: noise the target camera adds (in quadrature) to ``pixel_noise_std``.
        overwrite: replace a different world already at ``out_dir``; without it that raises ``FileExistsError``.

    A complete world with the same knobs already at ``out_dir`` is returned as it is (nothing is rewritten).
    """
    knobs = make_knobs(**knobs)
    out_dir = Path(out_dir)
    existing = read_world_manifest(out_dir)
    if existing is not None and existing.get("version") == GENERATOR_VERSION and existing.get("knobs") == _knobs_json(knobs):
        return existing
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and does not hold this world (different knobs or not a world); "
                              "pass overwrite=True (CLI: --overwrite) or choose another directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tree = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        manifest = _build(tree, knobs)
        _swap_into_place(tree, out_dir)
    except BaseException:
        shutil.rmtree(tree, ignore_errors=True)
        raise
    return manifest


def _swap_into_place(tree: Path, out_dir: Path) -> None:
    """Rename the finished ``tree`` to ``out_dir``, moving an old ``out_dir`` aside first and deleting it after."""
    old = None
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    elif out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        old.rmdir()
        os.replace(out_dir, old)
    os.replace(tree, out_dir)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def _parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 256x128, got {text!r}") from None
    return width, height


def _summary(manifest: dict) -> str:
    splits = manifest["splits"]
    lines = ["split          images  pixels"]
    lines += [f"{name:14s} {s['num_images']:6d}  {s['num_pixels']}" for name, s in splits.items()]
    lines.append("")
    lines.append(f"{'class':15s} {'src presence':>12s} {'tgt presence':>12s} {'src pixel':>10s} {'tgt pixel':>10s}")
    src, tgt = splits["source_train"], splits["target_train"]
    for k, name in enumerate(manifest["classes"]):
        lines.append(f"{name:15s} {src['presence_rate'][k]:12.3f} {tgt['presence_rate'][k]:12.3f} "
                     f"{src['pixel_prior'][k]:10.4f} {tgt['pixel_prior'][k]:10.4f}")
    return "\n".join(lines)


def cli_main(argv: list[str] | None = None) -> int:
    """``labelshift world --out DIR [--size 256x128] [--seed 0] [--num-source N] ...``: generate and summarise."""
    defaults = WorldKnobs()
    parser = argparse.ArgumentParser(prog="labelshift world", description="Generate the embedded synthetic world "
                                     "(GTA5-layout source, Cityscapes-layout target, world.json).")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--size", type=_parse_size, default=defaults.size, help="WIDTHxHEIGHT (default 256x128)")
    parser.add_argument("--overwrite", action="store_true", help="replace a different world already at --out")
    for name, value in asdict(defaults).items():
        if name != "size":
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value,
                                help=f"default {value}")
    args = vars(parser.parse_args(argv))
    out, overwrite = args.pop("out"), args.pop("overwrite")
    try:
        manifest = generate_world(out, overwrite=overwrite, **args)
    except (FileExistsError, ValueError) as err:
        print(f"labelshift world: error: {err}", file=sys.stderr)
        return 2
    print(f"world written to {Path(out).resolve()} (source: {manifest['layout']['source']['root']}/, "
          "target: cityscapes/, manifest: world.json)")
    print(_summary(manifest))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main())
