"""Batch prediction on Ray Data: one PNG per image, Cityscapes labelIds (what the official
``cityscapesscripts`` evaluation and the benchmark server take), trainIds or colours.

    python ray_jobs/predict.py --config C --checkpoint M (--images DIR | --split val) --out DIR \
        [--format labelids|trainids|color] [--adjust none|ia --priors ESTIMATE_DIR]

Files are ``<out>/<stem>.png`` (``_leftImg8bit`` dropped) at each image's own resolution, plus ``<out>/pseudo.json``
and ``<out>/labelling.json`` (what determines the files). Re-running the same command resumes; another checkpoint or
other settings into the same ``--out`` stop with the differences named, unless ``--overwrite``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working directory of `ray job submit`

from labelshift.config import ConfigError  # noqa: E402
from labelshift.runners.session import ray_session  # noqa: E402
from labelshift.predict import add_arguments, prediction_inputs  # noqa: E402


def main(argv: list[str] | None = None) -> int:

    from labelshift.pseudo import OutputConflict
    from labelshift.runners.data import RayDataPasses, run_labelling

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg, dataset, settings, priors_used = prediction_inputs(args)
        with ray_session(cfg.ray.address):
            run_labelling(RayDataPasses(), cfg, args.checkpoint, dataset, Path(args.out).resolve(), settings,
                          priors_used, overwrite=args.overwrite)
    except (ConfigError, OutputConflict) as err:
        print(f"{Path(__file__).name}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
