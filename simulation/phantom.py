"""Phantoms on real anatomy: the MNI152 2009 template shipped in nilearn, with a lesion, a skull and a plan.

World frames: the *planning* frame is the MNI RAS world (mm); the CT, the dose and the lesion
geometry live in it. A follow-up MR is written in its own world, related by ``mr_to_ct`` (4x4, RAS,
mm): ``x_ct = mr_to_ct @ x_mr`` for the same anatomical point.

Template-dependent arrays (template on the profile grid, head/skull HU) are cached as ``.npy`` files
under ``$PSP_FL_CACHE`` (default ``~/.cache/psp-fl``), one folder per voxel size.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from nibabel.affines import apply_affine
from scipy import ndimage
from scipy.spatial.transform import Rotation
from scipy.special import erfc

__all__ = [
    "Template",
    "Lesion",
    "Plan",
    "cache_dir",
    "load_template",
    "sample_rigid",
    "sample_plan",
    "sample_lesion",
    "lesion_fractions",
    "render_mr",
    "ct_hu",
    "dose_grid",
    "plan_dose",
]

CACHE_VERSION = 4
"""Bump when the cached arrays change meaning."""
PAD_MM = 25.0
"""Margin around the template's brain: room for the skull, the scalp and most of the MR's rigid offset."""

# Relative MR intensities (white matter ~ 0.87 in the template T1).
_NORMAL = {  # modality -> weights of (t1 template, gm, wm, csf)
    "t1": (1.0, 0.0, 0.0, 0.0),
    "t1ce": (1.0, 0.0, 0.0, 0.0),
    "flair": (0.0, 0.75, 0.55, 0.12),
    "t2": (0.0, 0.55, 0.4, 1.0),
}
_LESION = {  # modality -> (necrotic core, enhancing rim, oedema)
    "t1": (0.3, 0.6, 0.6),
    "t1ce": (0.3, 1.3, 0.62),
    "flair": (0.45, 0.8, 1.05),
    "t2": (1.0, 0.7, 0.92),
}


def cache_dir() -> Path:
    """Where template-dependent arrays are cached (``$PSP_FL_CACHE`` or ``~/.cache/psp-fl``)."""
    return Path(os.environ.get("PSP_FL_CACHE", Path.home() / ".cache" / "psp-fl")).expanduser()


@dataclass(frozen=True)
class Template:
    """The MNI152 anatomy on a profile grid (RAS, isotropic ``voxel_mm``), and the planning CT grid.

    Arrays on the phantom grid (``affine``): ``t1`` (template T1, 0..1), ``gm``, ``wm``, ``csf``
    (tissue fractions), ``brain`` (soft brain mask 0..1) and ``depth`` (mm from the brain surface,
    0 outside). ``hu`` (noise-free CT with skull) is on the CT grid ``ct_affine`` (LPS-ordered axial
    slices, in-plane ``voxel_mm``, slices 1.5x).
    """

    voxel_mm: float
    affine: np.ndarray
    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray
    depth: np.ndarray
    ct_affine: np.ndarray
    hu: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.t1.shape

    def voxel_centres(self, mask: np.ndarray) -> np.ndarray:
        """World (RAS mm) centres of the phantom-grid voxels where ``mask`` is true, shape (N, 3)."""
        ijk = np.argwhere(mask).astype(float)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]


_ARRAYS = ("t1", "gm", "wm", "csf", "brain", "depth", "hu")


@lru_cache(maxsize=2)
def load_template(voxel_mm: float) -> Template:
    """The template on a ``voxel_mm`` grid, built once and then read from the cache (memory-mapped)."""
    folder = cache_dir() / f"mni152-{voxel_mm:g}mm-v{CACHE_VERSION}"
    if not (folder / "meta.json").is_file():
        _build_cache(voxel_mm, folder)
    meta = json.loads((folder / "meta.json").read_text())
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in _ARRAYS}
    return Template(voxel_mm=voxel_mm, affine=np.array(meta["affine"]), ct_affine=np.array(meta["ct_affine"]),
                    **arrays)


def _box_grid(lower: np.ndarray, upper: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """RAS-aligned affine and shape of a grid covering [lower, upper] (mm)."""
    shape = tuple(int(n) for n in np.floor((upper - lower) / spacing + 1e-6) + 1)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = lower
    return affine, shape


def lps_ordered(affine_ras: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The same box as an RAS-aligned grid, indexed like standard axial DICOM (i -> L, j -> P, k -> S)."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:3, 3] = [shape[0] - 1, shape[1] - 1, 0]
    return affine_ras @ flip


def _build_cache(voxel_mm: float, folder: Path) -> None:
    from nilearn import datasets  # slow import, only when the cache is cold

    images = {
        "t1": datasets.load_mni152_template(resolution=1),
        "gm": datasets.load_mni152_gm_template(resolution=1),
        "wm": datasets.load_mni152_wm_template(resolution=1),
        "brain": datasets.load_mni152_brain_mask(resolution=1),
    }
    src_affine = images["t1"].affine
    brain_voxels = np.argwhere(np.asarray(images["brain"].dataobj) > 0.5)
    lower = apply_affine(src_affine, brain_voxels.min(axis=0)) - PAD_MM
    upper = apply_affine(src_affine, brain_voxels.max(axis=0)) + PAD_MM
    affine, shape = _box_grid(lower, upper, np.full(3, voxel_mm))
    to_src = np.linalg.inv(src_affine) @ affine
    sigma = max(0.0, (voxel_mm / src_affine[0, 0] - 1.0) / 2.0)  # anti-aliasing, as skimage's rescale
    out: dict[str, np.ndarray] = {}
    for name, image in images.items():
        data = np.asarray(image.get_fdata(), dtype=np.float32)
        if sigma > 0:
            data = ndimage.gaussian_filter(data, sigma)
        # 'nearest' continues the brainstem (cut by the template box) down into the neck padding.
        out[name] = ndimage.affine_transform(data, to_src, output_shape=shape, order=1, mode="nearest")
    brain = np.clip(out["brain"], 0.0, 1.0)
    out["brain"] = brain
    out["gm"] = np.clip(out["gm"], 0.0, 1.0) * brain
    out["wm"] = np.clip(out["wm"], 0.0, 1.0) * brain
    out["csf"] = np.clip(brain - out["gm"] - out["wm"], 0.0, 1.0)
    hu_phantom = _head_hu(out, voxel_mm)
    out["t1"] = out["t1"] * brain
    out["depth"] = ndimage.distance_transform_edt(brain > 0.5, sampling=voxel_mm).astype(np.float32)

    spacing = np.array([voxel_mm, voxel_mm, 1.5 * voxel_mm])
    ct_ras, ct_shape = _box_grid(lower, upper, spacing)
    ct_affine = lps_ordered(ct_ras, ct_shape)
    out["hu"] = ndimage.affine_transform(hu_phantom, np.linalg.inv(affine) @ ct_affine, output_shape=ct_shape,
                                         order=1, mode="nearest").astype(np.float32)

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    for name in _ARRAYS:
        np.save(tmp / f"{name}.npy", out[name].astype(np.float32))
    (tmp / "meta.json").write_text(json.dumps({"affine": affine.tolist(), "ct_affine": ct_affine.tolist()}))
    try:
        tmp.rename(folder)
    except OSError:  # another process built it first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)


def _head_hu(maps: dict[str, np.ndarray], voxel_mm: float) -> np.ndarray:
    """Noise-free CT (HU) on the phantom grid: brain, CSF, a skull shell with diploe, scalp, air.

    Brain HU is a function of the template T1 itself (``maps["t1"]``, not yet brain-masked), not
    of the GM/WM/CSF maps: the MR is that T1, and the maps sit ~0.15 mm (z) off it, which biased
    MR-to-CT registration by as much (bench/README.md, ``preprocess.py --pipeline``).
    """
    brain = maps["brain"]
    brain_hu = _brain_hu(maps["t1"] / np.maximum(brain, 1e-3), maps, brain > 0.5)
    # The skull follows a smooth envelope of the brain, not its sulci.
    envelope = ndimage.gaussian_filter(brain, 4.0 / voxel_mm) > 0.3
    outside = ndimage.distance_transform_edt(~envelope, sampling=voxel_mm)
    outer = np.full(brain.shape, -1000.0, dtype=np.float32)
    outer[outside <= 12.0] = 40.0  # scalp / soft tissue
    outer[outside <= 6.5] = 1500.0  # outer and inner tables
    outer[(outside > 2.0) & (outside <= 4.5)] = 800.0  # diploe
    outer[envelope] = 8.0  # CSF between brain and skull
    return (brain * brain_hu + (1.0 - brain) * outer).astype(np.float32)


_TISSUE_HU = {"csf": 8.0, "gm": 38.0, "wm": 30.0}


def _brain_hu(t1: np.ndarray, maps: dict[str, np.ndarray], inside: np.ndarray) -> np.ndarray:
    """HU interpolated piecewise-linearly over the mean T1 of the voxels each tissue dominates."""
    names = list(_TISSUE_HU)
    values = t1[inside]
    dominant = np.argmax(np.stack([maps[name][inside] for name in names]), axis=0)
    anchors = [float(values[dominant == k].mean()) for k in range(len(names))]
    if not anchors[0] < anchors[1] < anchors[2]:  # np.interp needs them increasing
        raise RuntimeError(f"template T1 tissue means are not ordered CSF < GM < WM: {dict(zip(names, anchors))}")
    return np.interp(t1, anchors, [_TISSUE_HU[name] for name in names]).astype(np.float32)


def sample_rigid(rng: np.random.Generator, *, max_angle_deg: float = 10.0,
                 max_shift_mm: float = 15.0) -> tuple[np.ndarray, np.ndarray]:
    """A random rigid ``mr_to_ct`` (4x4) and its 6 parameters.

    The parameters are the rotation vector (axis * angle, degrees) and the translation (mm):
    ``x_ct = R @ x_mr + t``.
    """
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = rng.uniform(0.3, 1.0) * max_angle_deg
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    shift = direction * rng.uniform(0.0, 1.0) * max_shift_mm
    rotvec_deg = axis * angle
    matrix = np.eye(4)
    matrix[:3, :3] = Rotation.from_rotvec(rotvec_deg, degrees=True).as_matrix()
    matrix[:3, 3] = shift
    return matrix, np.concatenate([rotvec_deg, shift])


@dataclass(frozen=True)
class Plan:
    """The RT plan: an ellipsoidal PTV around the original tumour and the dose model.

    dose(x) = rx * (core(s) * hot + (1 - core(s)) * bath(s)) inside the body, with s the signed
    distance (mm, approximately) to the PTV surface, core = erfc penumbra and bath = an exponential tail.
    """

    centre: np.ndarray
    radii_mm: np.ndarray
    prescription_gy: float
    penumbra_mm: float
    bath_fraction: float
    bath_mm: float

    def normalised_radius(self, points: np.ndarray) -> np.ndarray:
        return np.linalg.norm((points - self.centre) / self.radii_mm, axis=-1)

    def dose(self, points: np.ndarray) -> np.ndarray:
        rho = self.normalised_radius(points)
        s = (rho - 1.0) * float(np.exp(np.mean(np.log(self.radii_mm))))
        core = 0.5 * erfc(s / (np.sqrt(2.0) * self.penumbra_mm))
        hot = 1.0 + 0.03 * np.exp(-2.0 * rho**2)
        bath = self.bath_fraction * np.exp(-np.maximum(s, 0.0) / self.bath_mm)
        return self.prescription_gy * (core * hot + (1.0 - core) * bath)


def sample_plan(rng: np.random.Generator, template: Template) -> Plan:
    """Original tumour somewhere at least 12 mm deep in the brain; PTV radii 28-40 mm; 54-60 Gy."""
    centre = _random_point(rng, template, template.depth >= 12.0)
    return Plan(
        centre=centre,
        radii_mm=rng.uniform(28.0, 40.0, 3),
        prescription_gy=float(rng.choice([54.0, 59.4, 60.0], p=[0.2, 0.2, 0.6])),
        penumbra_mm=float(rng.uniform(3.5, 6.0)),
        bath_fraction=float(rng.uniform(0.2, 0.35)),
        bath_mm=float(rng.uniform(20.0, 35.0)),
    )


def _random_point(rng: np.random.Generator, template: Template, mask: np.ndarray) -> np.ndarray:
    return _pick(rng, template.voxel_centres(mask), template.voxel_mm)


def _pick(rng: np.random.Generator, candidates: np.ndarray, voxel_mm: float) -> np.ndarray:
    """One of the candidate voxel centres (N, 3), jittered within its voxel."""
    if len(candidates) == 0:
        raise RuntimeError("no phantom voxel satisfies the placement constraint")
    return candidates[rng.integers(len(candidates))] + rng.uniform(-0.5, 0.5, 3) * voxel_mm


@dataclass(frozen=True)
class Lesion:
    """A follow-up lesion (planning-frame geometry) whose look is set by the pattern latent ``u``.

    u -> 1 (TP-like): thick, nodular, nearly solid enhancement, bright, with wide oedema.
    u -> 0 (PsP-like): thin, diffuse (soft-edged) rim around a large necrotic core, little oedema.
    Visible at 5 mm voxels through the enhancing fraction, the rim thickness and the oedema extent.
    """

    centre: np.ndarray
    radius_mm: float
    rim_mm: float
    oedema_mm: float
    edge_mm: float
    enhancement: float
    lobulation: float
    lobe_axes: np.ndarray
    lobe_phases: np.ndarray

    @property
    def extent_mm(self) -> float:
        """Largest distance from the centre with any enhancing or necrotic voxel."""
        return self.radius_mm * (1.0 + self.lobulation) + 2.0 * self.edge_mm

    @property
    def oedema_extent_mm(self) -> float:
        return self.radius_mm * (1.0 + self.lobulation) + self.oedema_mm + 2.0 * self.edge_mm


def sample_lesion(rng: np.random.Generator, template: Template, u: float, plan: Plan | None = None) -> Lesion:
    """Shape from ``u`` plus noise; the centre is deep enough in the brain for the enhancing part.

    With a plan, the centre lies at a random normalised distance from the PTV centre: 55 % deep inside
    (< 0.5), 33 % marginal (0.5-1.15), 12 % outside (1.15-1.8); an empty shell widens until it is not.
    """
    radius = float(rng.uniform(9.0, 16.0))
    rim = float(np.clip(radius * (0.18 + 0.7 * u) + rng.normal(0.0, 1.0), 2.5, radius))
    lobulation = float(np.clip(0.06 + 0.16 * u + rng.normal(0.0, 0.03), 0.0, 0.3))
    lesion = Lesion(
        centre=np.zeros(3),
        radius_mm=radius,
        rim_mm=rim,
        oedema_mm=float(np.clip(3.0 + 20.0 * u + rng.normal(0.0, 2.5), 1.0, 30.0)),
        edge_mm=float(0.5 + 1.6 * (1.0 - u) + abs(rng.normal(0.0, 0.2))),
        enhancement=float(1.0 + 0.3 * u + rng.normal(0.0, 0.04)),
        lobulation=lobulation,
        lobe_axes=_unit_vectors(rng, 3),
        lobe_phases=rng.uniform(0.0, 2.0 * np.pi, 3),
    )
    candidates = template.voxel_centres(template.depth >= lesion.extent_mm + 2.0)
    candidates = candidates[_inside_crop(candidates, template, lesion.extent_mm)]
    if plan is None:
        return replace(lesion, centre=_pick(rng, candidates, template.voxel_mm))
    low, high = [(0.0, 0.5), (0.5, 1.15), (1.15, 1.8)][rng.choice(3, p=[0.55, 0.33, 0.12])]
    rho = plan.normalised_radius(candidates)
    shell = (rho >= low) & (rho < high)
    while not shell.any():
        low, high = max(0.0, low - 0.2), high + 0.2
        shell = (rho >= low) & (rho < high)
    return replace(lesion, centre=_pick(rng, candidates[shell], template.voxel_mm))


CROP_MM = 160.0
"""Side of the box the MR pipeline crops around the brain (psp_model.preprocess.mri): the enhancing
lesion must fit in it, or the case is (rightly) rejected by preprocessing."""


def _inside_crop(points: np.ndarray, template: Template, extent_mm: float) -> np.ndarray:
    """Points whose lesion (``extent_mm`` around them) stays inside the crop around the brain.

    The box is centred on the brain's bounding box; 10 mm of margin covers the follow-up MR's
    rigid offset (up to ~10 degrees), which moves the box relative to the anatomy.
    """
    brain = template.voxel_centres(template.brain > 0.5)
    centre = (brain.min(axis=0) + brain.max(axis=0)) / 2
    return np.all(np.abs(points - centre) <= CROP_MM / 2 - extent_mm - 10.0, axis=1)


def _unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    vectors = rng.normal(size=(n, 3))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def lesion_fractions(lesion: Lesion, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Soft fractions (necrotic core, enhancing rim, oedema envelope) at planning-frame ``points`` (N, 3).

    The oedema envelope includes the lesion; the caller keeps what lies outside it and in tissue.
    """
    offset = points - lesion.centre
    r = np.linalg.norm(offset, axis=-1)
    direction = offset / np.maximum(r, 1e-6)[:, None]
    lobes = np.mean(np.sin(2.5 * np.pi * direction @ lesion.lobe_axes.T + lesion.lobe_phases), axis=-1)
    rho = r / (1.0 + lesion.lobulation * lobes)

    def inside(radius: float, edge: float) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(np.clip((rho - radius) / edge, -50.0, 50.0)))

    outer = inside(lesion.radius_mm, lesion.edge_mm)
    core = inside(lesion.radius_mm - lesion.rim_mm, lesion.edge_mm) if lesion.rim_mm < lesion.radius_mm else 0 * rho
    oedema = inside(lesion.radius_mm + lesion.oedema_mm, 2.0 + lesion.edge_mm)
    return core, outer - core, oedema


def render_mr(
    template: Template,
    lesion: Lesion,
    mr_to_ct: np.ndarray,
    modalities: tuple[str, ...],
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Noise-free MR images and the BraTS label map on the MR grid (the phantom grid in the MR world).

    Returns ``(images, labels, brain)``: relative intensities per modality, uint8 labels
    (1 necrotic core, 2 oedema, 4 enhancing; all inside the brain) and the soft brain mask.
    """
    unknown = [m for m in modalities if m not in _NORMAL]
    if unknown:
        raise ValueError(f"unknown modality {unknown}; use any of {list(_NORMAL)}")
    to_phantom = np.linalg.inv(template.affine) @ mr_to_ct @ template.affine
    maps = {}
    for name in ("t1", "gm", "wm", "csf", "brain"):
        maps[name] = ndimage.affine_transform(np.asarray(getattr(template, name)), to_phantom, order=1,
                                              mode="nearest")
    brain = maps["brain"]
    inside_brain = brain > 0.5

    # Lesion only in a box around it (planning-frame geometry sampled at the MR voxels).
    centre_mr = np.linalg.solve(mr_to_ct, [*lesion.centre, 1.0])[:3]
    centre_ijk = np.linalg.solve(template.affine, [*centre_mr, 1.0])[:3]
    half = lesion.oedema_extent_mm / template.voxel_mm + 2
    lo = np.clip(np.floor(centre_ijk - half).astype(int), 0, template.shape)
    hi = np.clip(np.ceil(centre_ijk + half).astype(int) + 1, 0, template.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    ijk = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), axis=-1).reshape(-1, 3)
    to_ct = mr_to_ct @ template.affine
    points = ijk @ to_ct[:3, :3].T + to_ct[:3, 3]
    box_shape = tuple(hi - lo)
    core, rim, envelope = (f.reshape(box_shape) for f in lesion_fractions(lesion, points))
    in_box = brain[box]
    tissue = np.clip((maps["wm"][box] + 0.3 * maps["gm"][box]) / np.maximum(in_box, 1e-3), 0.0, 1.0)
    core, rim = core * in_box, rim * in_box
    oedema = np.clip(envelope - core - rim, 0.0, 1.0) * tissue * in_box
    normal_fraction = np.clip(1.0 - core - rim - oedema, 0.0, 1.0)

    images = {}
    for modality in modalities:
        w_t1, w_gm, w_wm, w_csf = _NORMAL[modality]
        image = w_t1 * maps["t1"] + w_gm * maps["gm"] + w_wm * maps["wm"] + w_csf * maps["csf"]
        i_core, i_rim, i_oedema = _LESION[modality]
        if modality == "t1ce":
            i_rim *= lesion.enhancement
        image[box] = normal_fraction * image[box] + core * i_core + rim * i_rim + oedema * i_oedema
        images[modality] = np.where(inside_brain, image, 0.0).astype(np.float32)

    labels = np.zeros(template.shape, dtype=np.uint8)
    box_labels = np.zeros(box_shape, dtype=np.uint8)
    box_labels[(envelope > 0.5) & (tissue > 0.2)] = 2
    box_labels[core + rim > 0.5] = 4
    box_labels[core > 0.5] = 1
    labels[box] = np.where(inside_brain[box], box_labels, 0)
    return images, labels, brain


def scanner(
    rng: np.random.Generator, image: np.ndarray, brain: np.ndarray, *, gain: float, noise: float, bias: float,
) -> np.ndarray:
    """Apply a site's scanner: smooth multiplicative bias field, Rician noise, gain; 0 outside the brain."""
    x, y, z = np.ogrid[-1.0:1.0:image.shape[0] * 1j, -1.0:1.0:image.shape[1] * 1j, -1.0:1.0:image.shape[2] * 1j]
    terms = [x, y, z, x * y, y * z, x * z, x**2 - 0.33, y**2 - 0.33, z**2 - 0.33]  # broadcast, not full arrays
    coefficients = rng.normal(0.0, 1.0, len(terms)) / np.sqrt(len(terms))
    field = np.exp(bias * sum(c * t for c, t in zip(coefficients, terms)))
    real = image + rng.normal(0.0, noise, image.shape)
    imaginary = rng.normal(0.0, noise, image.shape)
    noisy = np.sqrt(real**2 + imaginary**2)
    return np.where(brain > 0.5, gain * field * noisy, 0.0).astype(np.float32)


def ct_hu(rng: np.random.Generator, template: Template, *, noise_hu: float = 4.0) -> np.ndarray:
    """The planning CT (HU) on ``template.ct_affine`` with quantum noise (air stays exact)."""
    hu = np.asarray(template.hu)
    noisy = hu + rng.normal(0.0, noise_hu, hu.shape)
    return np.where(hu <= -999.0, hu, np.round(noisy)).astype(np.int16)


def dose_grid(
    rng: np.random.Generator, plan: Plan, lesion: Lesion, *, spacing_mm: float, partial: bool,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Affine (LPS-ordered axial, like a TPS export) and shape of a dose box around the PTV + 20 mm.

    The box also covers the lesion's enhancing extent unless ``partial``: then one face cuts through the
    lesion (on the side away from the PTV), so part of it may lie outside the grid.
    """
    lower = plan.centre - plan.radii_mm - 20.0
    upper = plan.centre + plan.radii_mm + 20.0
    reach = lesion.extent_mm + spacing_mm
    lesion_lower, lesion_upper = lesion.centre - reach, lesion.centre + reach
    if partial:
        axis = int(np.argmax(np.abs(lesion.centre - plan.centre)))
        away = np.sign(lesion.centre[axis] - plan.centre[axis])
        cut = lesion.centre[axis] + away * rng.uniform(-0.3, 0.6) * lesion.radius_mm
        if lesion.centre[axis] >= plan.centre[axis]:
            lesion_upper[axis] = cut
        else:
            lesion_lower[axis] = cut
    lower = np.minimum(lower, lesion_lower)
    upper = np.maximum(upper, lesion_upper)
    lower = np.floor(lower / spacing_mm) * spacing_mm
    upper = np.ceil(upper / spacing_mm) * spacing_mm
    affine, shape = _box_grid(lower, upper, np.full(3, spacing_mm))
    return lps_ordered(affine, shape), shape


def plan_dose(plan: Plan, template: Template, affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Dose (Gy) on a grid; zero in air (outside the CT's body)."""
    ijk = np.indices(shape).reshape(3, -1).T.astype(float)
    points = ijk @ affine[:3, :3].T + affine[:3, 3]
    to_ct = np.linalg.inv(template.ct_affine)
    ct_index = (points @ to_ct[:3, :3].T + to_ct[:3, 3]).T
    body = ndimage.map_coordinates(np.asarray(template.hu), ct_index, order=0, mode="constant", cval=-1000.0) > -500.0
    return np.where(body, plan.dose(points), 0.0).reshape(shape).astype(np.float64)
