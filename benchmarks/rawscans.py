"""Raw-scan benchmark (issue 28): pairs as clinicians load them, on anatomy held out of training, network
only and default, against ANTs SyN (antspyx defaults) in the same run, with each run's self-check.

    python benchmarks/rawscans.py --model M.safetensors [--baseline-model OLD.safetensors] [--threads 2]
                                  [--peers ants-syn] [--families brain,head,contrast,thick] [--poses 3]
                                  [--out benchmarks/rawscans]

Held-out anatomy: Colin27 (Debian mricron-data `ch2` head, `ch2bet` brain, AAL labels); no image or label map
of it is a training source. Every pair has Colin27 on one side. The other side is a population template (FSL
MNI152 brain with the FreeSurfer aseg of cvs_avg35_inMNI152, or ICBM 2009c brain with AAL2), whose image and
labels *were* training sources, or the ITK KmeansTest head (a training source too: its k-means classes and
skull-strip mask). The moving image is always re-posed: stored on an oblique (8 / 10 deg), anisotropic grid.
Families:
- brain: Colin27 brain (`ch2bet`) <-> templates (the case the model was already good at);
- head: Colin27 head with skull, scalp and neck (`ch2`) <-> templates, either side; and Colin27 head <-> the
  ITK head (scored on the brain mask only: the ITK subject has no structure labels);
- contrast: Colin27 brain rendered T2-like (intensity inverted inside the brain: CSF bright, WM dark) or
  PD-like (CSF and grey matter bright, white matter darker), either side, against the T1 templates;
- flair (only with --families flair): Colin27 brain rendered FLAIR-like (CSF dark, grey matter above white
  matter), either side, against both T1 templates;
- thick: Colin27 brain with 1 x 1 x 5 mm axial slices or 3 mm coronal slices (slice profile blurred),
  either side.
With `--poses N` every pair is also run N - 1 more times with the moving anatomy moved by a random rigid
transform (seeded), so that each family's comparison has several seeds and a spread.
Scored on the 14 structures (7 per side) the held-out AAL labels define: registration Dice warps the moving
image's true labels with each method's transform; segmentation Dice compares the method's fixed segmentation
with the fixed image's true labels. The self-check table lists each pair's `registration_status` and mean
agreement as `jointregseg run` reports them.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from JointRegSegLib.data import atlas_sources  # noqa: E402
from JointRegSegLib.data.label_table import LABEL_TABLE  # noqa: E402
from JointRegSegLib.evaluation.evaluate import environment_lines, evaluate, read_pairs  # noqa: E402
from JointRegSegLib.evaluation.methods import ExternalMethod, JointRegSegMethod  # noqa: E402
from JointRegSegLib.core.geometry import center_of_mass, make_grid  # noqa: E402
from JointRegSegLib.core.progress import stderr_progress  # noqa: E402

sys.path.insert(0, str(HERE))
from heldout import _rotation, _template, use_threads  # noqa: E402

BRAIN_TABLE = [{"value": 0, "name": "background", "color": [0, 0, 0]}, {"value": 1, "name": "brain", "color": [1, 1, 1]}]


def _write(image, labels, folder: Path, name: str, grid: sitk.Image, slice_sigma=None):
    if slice_sigma is not None:   # the slice profile: thick slices average the tissue across them
        image = sitk.SmoothingRecursiveGaussian(image, slice_sigma)
    sitk.WriteImage(sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32),
                    str(folder / f"{name}.nii.gz"), True)
    sitk.WriteImage(sitk.Resample(labels, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8),
                    str(folder / f"{name}_labels.nii.gz"), True)


def _grid(image, oblique: bool, head: bool, spacing=None, angles=(8.0, 0.0, 10.0)):
    extent = np.array([192.0, 228.0, 204.0] if head else [180.0, 216.0, 180.0])
    spacing = np.array(spacing or ((1.5, 1.5, 2.5) if oblique else (1.5, 1.5, 1.5)))
    size = np.round(extent / spacing).astype(int)
    direction = _rotation(angles) if oblique else np.eye(3)
    return make_grid(size, spacing, direction, center_of_mass(image))


def _contrast(image: sitk.Image, kind: str) -> sitk.Image:
    """T2-like, PD-like or FLAIR-like rendering of a T1 image (background stays 0)."""
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    inside = array > 0
    p5, p40, p60, p95 = np.percentile(array[inside], [5, 40, 60, 95])
    if kind == "t2":
        out = np.interp(array, [p5, p40, p95], [1.0, 0.55, 0.3])
    elif kind == "flair":   # fluid suppressed: CSF dark as in T1, white matter darker than grey as in T2
        out = np.interp(array, [p5, p40, p60, p95], [0.12, 0.8, 0.7, 0.5])
    else:
        out = np.interp(array, [p5, p40, p60, p95], [0.8, 0.95, 0.85, 0.65])
    out = np.where(inside, out * 1000, 0).astype(np.float32)
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(image)
    return result


def _colin(head: bool):
    image, labels = atlas_sources.colin27_heldout()
    if head:
        image = sitk.ReadImage(str(atlas_sources.MRICRON / "ch2.nii.gz"), sitk.sitkFloat32)
    return image, labels


def _itk_head():
    raw = sitk.ReadImage(str(atlas_sources.ITK_EXAMPLES / "KmeansTest_T1UCharRaw.nii.gz"), sitk.sitkFloat32)
    strip = sitk.Cast(sitk.ReadImage(str(atlas_sources.ITK_EXAMPLES / "KmeansTest_T1RawSkullStrip.nii.gz")) > 4,
                      sitk.sitkUInt8)
    return raw, strip


def build_pairs(folder: Path, families) -> dict[str, Path]:
    """One pairs CSV per family (and `head-brainmask` for the ITK head pairs) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "pairs.json"
    built = {k: Path(v) for k, v in json.loads(done.read_text()).items()} if done.is_file() else {}
    if built and all(f in built for f in families):
        return built if not families else {k: v for k, v in built.items() if k in families
                                           or (k == "head-brainmask" and "head" in families)}
    templates = {"mni152": _template("mni152"), "icbm2009c": _template("icbm2009c")}
    for name, (image, labels) in templates.items():
        _write(image, labels, folder, name, _grid(image, False, False))
        _write(image, labels, folder, f"{name}_oblique", _grid(image, True, False))
    rows = {}

    def add(family, moving, fixed):
        rows.setdefault(family, []).append(f"{moving}_to_{fixed},{moving}.nii.gz,{fixed}.nii.gz,"
                                           f"{moving}_labels.nii.gz,{fixed}_labels.nii.gz")

    def both_ways(family, colin_fixed, colin_moving):
        for template in templates:
            add(family, colin_moving, template)
            add(family, f"{template}_oblique", colin_fixed)

    brain, brain_labels = _colin(head=False)
    head, _ = _colin(head=True)
    if "brain" in families:
        _write(brain, brain_labels, folder, "colin27", _grid(brain, False, False))
        _write(brain, brain_labels, folder, "colin27_oblique", _grid(brain, True, False))
        both_ways("brain", "colin27", "colin27_oblique")
    if "head" in families:
        _write(head, brain_labels, folder, "colin27head", _grid(head, False, True))
        _write(head, brain_labels, folder, "colin27head_oblique", _grid(head, True, True))
        both_ways("head", "colin27head", "colin27head_oblique")
        raw, strip = _itk_head()
        colin_mask = sitk.Cast(sitk.ReadImage(str(atlas_sources.MRICRON / "ch2bet.nii.gz")) > 0, sitk.sitkUInt8)
        _write(head, colin_mask, folder, "colin27headmask", _grid(head, False, True))
        _write(head, colin_mask, folder, "colin27headmask_oblique", _grid(head, True, True))
        _write(raw, strip, folder, "itkhead", _grid(raw, False, True))
        _write(raw, strip, folder, "itkhead_oblique", _grid(raw, True, True, angles=(-8.0, 0.0, 12.0)))
        add("head-brainmask", "colin27headmask_oblique", "itkhead")
        add("head-brainmask", "itkhead_oblique", "colin27headmask")
    if "contrast" in families:
        for kind, template in (("t2", "mni152"), ("pd", "icbm2009c")):
            rendered = _contrast(brain, kind)
            _write(rendered, brain_labels, folder, f"colin27{kind}", _grid(brain, False, False))
            _write(rendered, brain_labels, folder, f"colin27{kind}_oblique", _grid(brain, True, False))
            add("contrast", f"colin27{kind}_oblique", template)
            add("contrast", f"{template}_oblique", f"colin27{kind}")
    if "flair" in families:
        rendered = _contrast(brain, "flair")
        _write(rendered, brain_labels, folder, "colin27flair", _grid(brain, False, False))
        _write(rendered, brain_labels, folder, "colin27flair_oblique", _grid(brain, True, False))
        for template in templates:
            add("flair", "colin27flair_oblique", template)
            add("flair", f"{template}_oblique", "colin27flair")
    if "thick" in families:
        for kind, spacing, sigma, template in (("axial5mm", (1.0, 1.0, 5.0), (0.0, 0.0, 5 / 2.355), "mni152"),
                                               ("coronal3mm", (1.0, 3.0, 1.0), (0.0, 3 / 2.355, 0.0), "icbm2009c")):
            _write(brain, brain_labels, folder, f"colin27{kind}", _grid(brain, False, False, spacing),
                   slice_sigma=[max(s, 0.01) for s in sigma])
            _write(brain, brain_labels, folder, f"colin27{kind}_oblique",
                   _grid(brain, True, False, spacing), slice_sigma=[max(s, 0.01) for s in sigma])
            add("thick", f"colin27{kind}_oblique", template)
            add("thick", f"{template}_oblique", f"colin27{kind}")
    out = {}
    for family, lines in rows.items():
        path = folder / f"pairs_{family}.csv"
        path.write_text("name,moving,fixed,moving_labels,fixed_labels\n" + "\n".join(lines) + "\n", encoding="utf-8")
        out[family] = path
    done.write_text(json.dumps({**{k: str(v) for k, v in built.items()}, **{k: str(v) for k, v in out.items()}}))
    return out


POSE_DEGREES, POSE_MM = 10.0, 10.0   # a random pose: rotation up to this about each axis, shift up to this


def add_poses(folder: Path, csvs: dict, poses: int) -> dict[str, Path]:
    """Pairs CSVs with each family's pairs `poses` times: pose 0 as built, pose k >= 1 with the moving image
    and its labels moved by a random rigid transform (seeded by k and the image; rotation up to POSE_DEGREES
    about each axis around the image centre, shift up to POSE_MM), resampled on the moving image's own
    (oblique) grid: the anatomy itself re-posed, not only its storage. Each pose is a seed of the comparison."""
    if poses <= 1:
        return csvs
    out = {}
    for family, csv_path in csvs.items():
        lines = csv_path.read_text(encoding="utf-8").splitlines()
        rows = list(lines[1:])
        for line in lines[1:]:
            name, moving, fixed, moving_labels, fixed_labels = line.split(",")
            for pose in range(1, poses):
                posed = f"{moving[:-len('.nii.gz')]}_pose{pose}"
                if not (folder / f"{posed}_labels.nii.gz").is_file():
                    rng = np.random.default_rng([pose, *moving.encode()])   # one pose per image and k
                    image = sitk.ReadImage(str(folder / moving), sitk.sitkFloat32)
                    labels = sitk.ReadImage(str(folder / moving_labels))
                    rigid = sitk.Euler3DTransform()
                    rigid.SetCenter(image.TransformContinuousIndexToPhysicalPoint(
                        [(n - 1) / 2 for n in image.GetSize()]))
                    rigid.SetRotation(*np.deg2rad(rng.uniform(-POSE_DEGREES, POSE_DEGREES, 3)))
                    rigid.SetTranslation(rng.uniform(-POSE_MM, POSE_MM, 3).tolist())
                    background = float(sitk.GetArrayViewFromImage(image).min())
                    sitk.WriteImage(sitk.Resample(image, image, rigid, sitk.sitkLinear, background),
                                    str(folder / f"{posed}.nii.gz"), True)
                    sitk.WriteImage(sitk.Resample(labels, labels, rigid, sitk.sitkNearestNeighbor, 0),
                                    str(folder / f"{posed}_labels.nii.gz"), True)
                rows.append(f"{name}_pose{pose},{posed}.nii.gz,{fixed},{posed}_labels.nii.gz,{fixed_labels}")
        out[family] = folder / f"pairs_{family}_poses{poses}.csv"
        out[family].write_text("\n".join([lines[0]] + rows) + "\n", encoding="utf-8")
    return out


class Recording(JointRegSegMethod):
    """JointRegSegMethod that keeps each run's qc (self-check) in order."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.qcs = []

    def run(self, moving, fixed):
        from JointRegSegLib.evaluation.methods import Outcome, PeakMemory
        from JointRegSegLib.inference.pipeline import register_and_segment
        with PeakMemory() as memory:
            result = register_and_segment(moving, fixed, self.model, device=self.device,
                                          refine_iterations=self.refine_iterations, **self.options)
        self.qcs.append(result.qc)
        return Outcome(result.displacement, float(result.qc["timing_s"]["total"]), memory.peak_mb,
                       result.fixed_segmentation if self.segment else None)


def earlier_peer_rows(path: Path, pair_names: set) -> list[dict]:
    """The peers' rows (methods other than JointRegSeg's and the baseline model's) of an earlier run of the
    same pairs, numbers as numbers."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["pair"] in pair_names and not r["method"].startswith(
            ("JointRegSeg", "previous default"))]
    for row in rows:
        for key, value in row.items():
            if key not in ("pair", "method"):
                row[key] = float(value) if value not in ("", None) else float("nan")
    return rows


def family_table(rows_by_family: dict, reference: str) -> str:
    lines = ["| family | pairs | method | reg. Dice mean | mean of each pose | worst pair / SyN's there | "
             "pairs below 0.9 x SyN | seg. Dice (fixed) |", "|---|---|---|---|---|---|---|---|"]
    for family, rows in rows_by_family.items():
        methods = list(dict.fromkeys(r["method"] for r in rows))
        syn = {r["pair"]: r["registration_dice"] for r in rows if r["method"] == reference}
        for method in methods:
            mine = [r for r in rows if r["method"] == method]
            dice = np.array([r["registration_dice"] for r in mine])
            ratios = [(r["registration_dice"] / syn[r["pair"]], r) for r in mine if syn.get(r["pair"])]
            worst = min(ratios, key=lambda t: t[0]) if ratios else None
            below = sum(1 for ratio, _ in ratios if ratio < 0.9)
            seg = [r["segmentation_dice"] for r in mine if r["segmentation_dice"] == r["segmentation_dice"]]
            by_pose = {}
            for r in mine:
                by_pose.setdefault(r["pair"].rsplit("_pose", 1)[1] if "_pose" in r["pair"] else "0", []).append(
                    r["registration_dice"])
            poses = " / ".join(f"{np.mean(v):.3f}" for _, v in sorted(by_pose.items()))
            lines.append(f"| {family} | {len(mine)} | {method} | {dice.mean():.3f} | {poses} | "
                         + (f"{worst[1]['registration_dice']:.3f} / {syn[worst[1]['pair']]:.3f} ({worst[1]['pair']})"
                            if worst else "–") + f" | {below if ratios else '–'} | "
                         + (f"{np.mean(seg):.3f}" if seg else "–") + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--baseline-model", default=None, help="an earlier model (registration scored)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peers", default="ants-syn")
    parser.add_argument("--families", default="brain,head,contrast,thick")
    parser.add_argument("--rendered-variant", action="store_true",
                        help="also run the model with registration_input 'segmentation' (network only)")
    parser.add_argument("--reuse-peers", default=None, metavar="DIR",
                        help="take the peers' rows from an earlier run's results_<family>.csv in DIR (the same "
                             "cached pairs) instead of running them again; RESULTS.md says so")
    parser.add_argument("--poses", type=int, default=1,
                        help="each pair this many times: pose 0 as built, the others with the moving anatomy moved "
                             f"by a random rigid transform (up to {POSE_DEGREES:.0f} deg, {POSE_MM:.0f} mm)")
    parser.add_argument("--work", default=str(HERE / "work" / "rawscans"))
    parser.add_argument("--out", default=str(HERE / "rawscans"))
    args = parser.parse_args(argv)
    threads = use_threads(args.threads)
    families = [f for f in args.families.split(",") if f]
    csvs = add_poses(Path(args.work) / "pairs", build_pairs(Path(args.work) / "pairs", families), args.poses)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_by_family, checks = {}, []
    for family, csv_path in csvs.items():
        pairs = read_pairs(csv_path)
        table = BRAIN_TABLE if family == "head-brainmask" else LABEL_TABLE
        network_only = Recording(args.model, 0, "cpu", name="JointRegSeg (network only)", scale_search=False,
                                 segment=family != "head-brainmask")
        default = network_only
        methods = [network_only]
        if network_only.model.card.get("inference", {}).get("scales"):
            # a card that searches the velocity scale by default: its default run is another row
            default = Recording(args.model, 0, "cpu", name="JointRegSeg (default)", segment=family != "head-brainmask")
            methods.append(default)
        if args.rendered_variant:
            # the same model registering images rendered from its own segmentations (card registration_input)
            rendered = Recording(args.model, 0, "cpu", name="JointRegSeg (network only, segmentation-rendered input)",
                                 scale_search=False, segment=False)
            rendered.model.card["registration_input"] = "segmentation"
            methods.append(rendered)
        if args.baseline_model:
            methods.append(JointRegSegMethod(args.baseline_model, 0, "cpu", name="previous default model",
                                             segment=False))
        for peer in [p for p in args.peers.split(",") if p]:
            methods.append(ExternalMethod(peer, [sys.executable, str(HERE / "peers.py"), peer]))
        rows = evaluate(pairs, methods, table, progress=stderr_progress, hd95=False)
        if args.reuse_peers:
            rows += earlier_peer_rows(Path(args.reuse_peers) / f"results_{family}.csv", {p.name for p in pairs})
        rows_by_family[family] = rows
        for pair, qc in zip(pairs, default.qcs):
            checks.append({"family": family, "pair": pair.name, "status": qc.get("registration_status"),
                           "agreement_mean": qc.get("agreement_mean"),
                           "attempts": qc.get("registration_attempts"), "warnings": qc.get("warnings"),
                           "brain": qc.get("brain"), "contrast": qc.get("contrast")})
        with open(out / f"results_{family}.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    (out / "selfcheck.json").write_text(json.dumps(checks, indent=1), encoding="utf-8")
    check_lines = ["| family | pair | status | agreement | attempts |", "|---|---|---|---|---|"]
    check_lines += [f"| {c['family']} | {c['pair']} | {c['status']} | {c['agreement_mean']} | "
                    + ", ".join(f"{a['affine_method']}: {a['agreement_mean']}" for a in c["attempts"] or []) + " |"
                    for c in checks]
    text = (f"# Raw-scan benchmark\n\nGenerated {datetime.date.today()} by `python benchmarks/rawscans.py --model "
            f"{Path(args.model).name} --poses {args.poses}` with {threads} threads; "
            + (f"the peers' rows are those of the earlier run in `{args.reuse_peers}` on the same cached pairs "
               "(not run again here)" if args.reuse_peers else "every method ran on the same pairs in this one run")
            + ".\n\n"
            f"{environment_lines()}\nColin27 is held out of training on every pair; the templates and the ITK head "
            "were training sources (see the script's docstring). Registration Dice over the 14 structures of the "
            "held-out AAL labels (brain mask for head-brainmask); network only = no velocity-scale search, no "
            "refinement. "
            + (f"Every pair {args.poses} times: pose 0 as built, poses 1-{args.poses - 1} with the moving anatomy "
               f"moved by a random rigid transform (up to {POSE_DEGREES:.0f} deg about each axis, {POSE_MM:.0f} mm); "
               "'mean of each pose' is the family mean per pose, its spread the seeds' spread. "
               if args.poses > 1 else "")
            + "JointRegSeg's default card (contrast-matched registration, no velocity-scale search) is the "
            "network-only row.\n\n" + family_table(rows_by_family, "ants-syn")
            + "\n## Self-check of each default run\n\n" + "\n".join(check_lines) + "\n")
    (out / "RESULTS.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
