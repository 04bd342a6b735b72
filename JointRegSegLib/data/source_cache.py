"""The offline label-map sources of synthetic training, cached in a `--data` folder (`sources.npz` +
`sources.json`, built from the installed data packages on first use)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import atlas_sources, wholebrain_sources


def load_sources(data_dir: Path, kind: str = "subcortical"):
    """Training sources from `data_dir/sources.npz` (built from the offline packages on first use).
    `kind`: "subcortical" (the 7-structure table, `atlas_sources`) or "whole-brain" (partial labels,
    brain masks and the ITK head, `wholebrain_sources`)."""
    if kind not in ("subcortical", "whole-brain"):
        raise ValueError(f"sources {kind!r}: choose 'subcortical' or 'whole-brain'")
    data_dir = Path(data_dir)
    path = data_dir / "sources.npz"
    meta_path = data_dir / "sources.json"
    if kind == "whole-brain" and path.is_file() and meta_path.is_file() and json.loads(
            meta_path.read_text(encoding="utf-8")).get("brain") != wholebrain_sources.BRAIN_CONVENTION:
        # a cache built before the brains were drawn as they are now: build it again, never train on it
        path.unlink()
    if not path.is_file():
        data_dir.mkdir(parents=True, exist_ok=True)
        sources = (wholebrain_sources if kind == "whole-brain" else atlas_sources).training_sources()
        arrays = {}
        for s in sources:
            for key in ("generation", "target", "image", "brain"):
                if getattr(s, key, None) is not None:
                    arrays[f"{s.name}/{key}"] = getattr(s, key)
        tmp = data_dir / "sources.tmp.npz"
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)
        meta = [{"name": s.name, "provenance": s.provenance, "licence": s.licence,
                 "has_target": s.target is not None, "has_image": s.image is not None,
                 **({"known": list(s.known), "head": s.head} if kind == "whole-brain" else {})} for s in sources]
        convention = {"brain": wholebrain_sources.BRAIN_CONVENTION} if kind == "whole-brain" else {}
        meta_path.write_text(json.dumps({"grid": atlas_sources.COMMON_GRID, "kind": kind, **convention,
                                         "sources": meta}, indent=2), encoding="utf-8")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("kind", "subcortical") != kind:
        raise ValueError(f"{data_dir} holds {meta.get('kind', 'subcortical')} sources, not {kind}: use another --data folder")
    arrays = np.load(path)
    sources = []
    for m in meta["sources"]:
        get = lambda key: arrays[f"{m['name']}/{key}"] if f"{m['name']}/{key}" in arrays else None
        common = (m["name"], get("generation"), get("target"), get("image"), m["provenance"], m["licence"])
        if kind == "whole-brain":
            sources.append(wholebrain_sources.PartialSource(*common, known=tuple(m["known"]), brain=get("brain"),
                                                            head=m["head"]))
        else:
            sources.append(atlas_sources.SynthSource(*common))
    return sources, meta
