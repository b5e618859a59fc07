"""The ``ul3d`` command line: ``ul3d <command> [options]`` (``ul3d --help`` lists the commands)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _add_profile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile",
        help="params, MACs and activation memory of ul3d's networks and MONAI's",
        description="Print params, MACs (true convolution MACs and the papers' convention) and an estimate of "
        "forward activation memory for ul3d's networks and MONAI's UNet, SegResNet, SwinUNETR, UNETR and DynUNet.",
    )
    p.add_argument(
        "networks", nargs="*", metavar="NAME[:VARIANT]",
        help="e.g. ultralightunet:M aulunet unet (MONAI peers: unet segresnet swinunetr unetr dynunet). "
        "Default: every ul3d variant and every MONAI peer.",
    )
    p.add_argument("--spatial-dims", type=int, default=3, choices=(2, 3))
    p.add_argument("--roi", type=int, nargs="+", default=None, help="input size per axis (default 96³ / 256²)")
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--out-channels", type=int, default=3)
    p.add_argument("--batch", type=int, default=1, help="batch size of the profiled input (default 1)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_run_profile)


def _run_profile(args: argparse.Namespace) -> int:
    from .profiling import profile_table

    roi = args.roi or ([96] * 3 if args.spatial_dims == 3 else [256] * 2)
    if len(roi) == 1:
        roi = roi * args.spatial_dims
    if len(roi) != args.spatial_dims:
        raise SystemExit(f"ul3d profile: --roi needs {args.spatial_dims} sizes for --spatial-dims {args.spatial_dims}, got {roi}")
    try:
        rows = profile_table(args.networks, args.spatial_dims, roi, args.in_channels, args.out_channels, args.batch)
    except ValueError as e:
        raise SystemExit(f"ul3d profile: {e}") from None
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        from .profiling import format_table

        print(format_table(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="ul3d", description="Ultra-lightweight U-shaped networks for medical image segmentation.")
    parser.add_argument("--version", action="version", version=f"ul3d {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_profile(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
