"""Prepare and check the datasets folder ($DATA) for CoOp's 15 datasets.

Run from the repository root:

    python prepare_data.py download --root $DATA [--datasets OxfordPets dtd ...] [--force]
    python prepare_data.py check    --root $DATA [--datasets ...] [--verify-images]
    python prepare_data.py hashes   --root $DATA   # SHA-256 lines for datasets/catalog.py

``download`` fetches CoOp's split files (``split_zhou_*.json``), Flowers' ``cat_to_name.json``
and ImageNet's ``classnames.txt`` (the images themselves come from each dataset's site, see
DATASETS.md). Offline, it prints for each file the URL to fetch and where to put it.
``check`` prints one row per dataset: ready / missing (what) / malformed (what).
Exit status: 0 when everything asked for is downloaded / ready, 1 otherwise, 2 on bad usage.
"""
from __future__ import annotations

import argparse
import os
import sys

from tabulate import tabulate

from datasets.catalog import CATALOG
from datasets.prepare import check_dataset, download_files, select_specs
from selftpt.cli import user_errors
from selftpt.errors import UserError


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("download", "fetch split / class-name files into $DATA"),
        ("check", "report per dataset: ready / missing / malformed"),
        ("hashes", "print the SHA-256 of downloaded files, to record in datasets/catalog.py"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--root", default=os.environ.get("DATA", ""),
                       help="folder holding one sub-folder per dataset (default: $DATA)")
        p.add_argument("--datasets", nargs="+", default=[], metavar="NAME",
                       help=f"registry names or config stems (default: all): {' '.join(CATALOG)}")
        if name == "download":
            p.add_argument("--force", action="store_true", help="re-download files that already verify")
        if name == "check":
            p.add_argument("--verify-images", action="store_true", help="also decode every image (slow)")
    return parser.parse_args(argv)


def _download(args: argparse.Namespace, specs: list) -> int:
    results = download_files(args.root, specs, force=args.force)
    rows = [(r.dataset, r.path, r.status, r.detail) for r in results]
    print(tabulate(rows, headers=["Dataset", "File", "Status", "Detail"]))
    failed = [r for r in results if not r.ok]
    if failed:
        print(f"\n{len(failed)} file(s) could not be installed (offline, or Google Drive refused). "
              "Fetch each in a browser and save it under the name shown:")
        for r in failed:
            print(f"  {r.remote.url}  ->  {r.path}")
        print("Then run: python prepare_data.py check --root " + args.root)
    return 1 if failed else 0


def _check(args: argparse.Namespace, specs: list) -> int:
    results = [check_dataset(spec, args.root, verify_images=args.verify_images) for spec in specs]
    print(tabulate([(r.dataset, r.folder + "/", r.status, r.details) for r in results],
                   headers=["Dataset", "Folder", "Status", "Details"]))
    ready = sum(r.status == "ready" for r in results)
    print(f"\n{ready}/{len(results)} ready under {os.path.abspath(args.root)} (see DATASETS.md)")
    return 0 if ready == len(results) else 1


def _hashes(args: argparse.Namespace, specs: list) -> int:
    from datasets.prepare import sha256_of

    seen = set()
    for spec in specs:
        for remote in spec.remote:
            path = os.path.join(args.root, spec.folder, remote.filename)
            if os.path.isfile(path) and remote.filename not in seen:
                seen.add(remote.filename)
                print(f'    "{remote.filename}": "{sha256_of(path)}",')
    return 0


@user_errors
def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if not args.root:
        raise UserError("give --root /path/to/datasets (or set $DATA)")
    try:
        specs = select_specs(args.datasets)
    except KeyError as e:  # an unknown dataset name; the message lists the known ones
        raise UserError(e.args[0]) from None
    return {"download": _download, "check": _check, "hashes": _hashes}[args.command](args, specs)


if __name__ == "__main__":
    sys.exit(main())
