"""Synthetic SYSU-MM01 / RegDB / LLCM datasets in the exact on-disk layouts of the real ones.

Usage::

    python -m torchreid_vi.tools.synthesize --dataset sysu_mm01 --root /tmp/data/SYSU-MM01 \\
        [--seed 0] [--num-ids 60] [--num-test-ids N] [--workers 2] [--size 64x32] \\
        [--manifest /tmp/data/sysu.json]

``--root`` is the dataset root itself (the folder that holds ``cam1/`` .. ``cam6/`` and ``exp/`` for
SYSU, ``Visible/ Thermal/ idx/`` for RegDB, ``vis/ nir/ test_vis/ test_nir/ idx/`` for LLCM).
Nothing but the real layout is written there; the manifest (JSON) goes elsewhere. The same seed
gives byte-identical files.

Python API::

    >>> import tempfile, os
    >>> from torchreid_vi.tools.synthesize import make_regdb
    >>> m = make_regdb(os.path.join(tempfile.mkdtemp(), 'RegDB'), seed=0, num_ids=4)
    >>> m['trials']['1']['query']['ir']['num_images']      # 2 test ids x 10 thermal frames
    20

Layouts (spec ``datasets_and_protocols.md`` §1, §7.1)
------------------------------------------------------
* SYSU-MM01: ``cam{1..6}/{pid:04d}/{k:04d}.jpg`` (k = 1..n),
  ``exp/{train,val,test,available}_id.txt`` (one comma-separated line; train/test end with a
  newline, val/available do not) plus ``.mat`` twins (key ``'id'``, uint16 ``(1, N)``),
  ``exp/rand_perm_cam.mat`` with the official nesting (object ``(6, 1)`` -> object ``(N_c, 1)`` ->
  uint8 ``(10, n)``, ``(10, 0)`` for absent pids, ``N_c`` = largest pid with images in camera c).
  Pids 1..N with gaps (pids without any folder) and a few pids seen by ONE camera only (they have
  images but are in no id list, as 22 pids of the real data); the available ids are split
  train/val/test by a seeded shuffle (the splits interleave). Every available pid has cams 1, 2, 3;
  cams 4, 5, 6 are dropped with p = 0.25 (test pids keep cam 6); 12-20 images per cell and one test
  cell in cam 4 or 5 with exactly 7 images.
* RegDB: ``Visible/<pid>/<sex>_<view>_v_<frame:05d>_<pid>.bmp`` and ``Thermal/... _t_ ...`` (sex =
  female for odd pids, view = back when pid % 3 == 0, frame = 100 pid + k, k = 0..9),
  ``idx/{train,test}_{visible,thermal}_{t}.txt`` for t = 1..10: a seeded permutation of the pids,
  first half train, second half test; the label of a line is the position of its pid in the permuted
  half (identical in the visible and thermal files).
* LLCM: ``{vis,nir}/{pid:04d}/{pid:04d}_c{cam:02d}_s{seq:06d}_f{frame}_{vis,nir}.jpg``; train pids
  1..N/2, test pids N/2+1..N; per (pid, modality) 3 distinct cameras out of 1..9 (never cam 3 for
  test NIR), 1-3 frames each; every test image is copied under the same name into
  ``test_{vis,nir}/cam{cam}/{pid:04d}/`` (no ``test_nir/cam3``); ``idx/train_{vis,nir}.txt``
  (0-based labels in ascending pid order, shared), ``idx/test_{vis,nir}.txt`` (label = pid) and
  ``idx/test_id.txt``.
* Exactly ONE infrared file per dataset is saved as a 1-channel (``'L'``) image (its root-relative
  path is ``manifest['l_mode_file']``); every other infrared file is an RGB image with 3 identical
  channels.

Image model (why cross-modal matching is learnable but not trivial)
--------------------------------------------------------------------
Each identity is a procedurally drawn person, seeded by ``(seed, dataset, pid)``:

* Shape (in units of the person's height): head size, shoulder and waist width, torso length, arm
  width and length, leg width and gap, sleeves (long/short), lower garment (trousers/shorts/skirt),
  hair length, and a bag (none / shoulder bag with strap / hand bag) on a fixed side.
* Materials: hair, skin, upper garment (2 yarns A/B), lower garment (2 yarns A/B), shoes, bag. Each
  material has a visible RGB colour and a hidden near-infrared reflectance
  ``ir = clip(0.45 * luma(rgb) + 0.55 * h, 0.04, 0.96)`` with ``h ~ U(0, 1)`` drawn per material
  (dyes differ in the NIR band, so IR brightness is only partly predictable from colour). Skin is
  bright in NIR (0.62-0.85). Yarns A and B of a garment differ by at least 0.12 in ``ir`` so that
  most textures stay visible in IR.
* Texture of each garment: plain, horizontal / vertical / diagonal stripes, checks or dots, with an
  identity-specific frequency (5-11 cycles per person height), angle, phase and duty cycle; texture
  coordinates live on the body, so patterns scale and mirror with the person.

Each image draws a viewpoint: person scale (fraction of the image height), horizontal/vertical
shift, mirroring, front/back view (back: no face, long hair over the back), leg stride, arm spread,
light direction, and (p = 0.06) an occluder over the bottom of the image. Cameras differ in
background colour and clutter (random poles/doors from a camera palette, a floor band) and:

* visible cameras: gain (illumination, with per-image jitter), colour temperature (per-channel
  tint), sensor noise; pixel = rgb(material) * shading * gain * tint.
* near-infrared cameras (SYSU cams 3 and 6, LLCM NIR): pixel = ir(material) * shading * gain;
  stronger noise, a [1, 2, 1] blur; gray replicated to 3 channels. NOT a gray conversion of the
  visible image: hue is lost, shape, texture and per-material IR brightness remain.
* thermal camera (RegDB): pixel = emission(material) * gain over a cool background, where emission
  is high for skin, lower for clothes (``0.25 + 0.45 * ir``, i.e. tied to the same hidden material
  property) and textures keep only 40 % of their contrast; two blur passes.

Rendering is vectorised over the images of one (pid, camera) cell at 2x supersampling with meshgrid
masks, then box-downsampled; PIL is only used to encode the files. ``tests/test_synthesize.py``
checks that a colour histogram matches IR queries to visible images at about chance level while a
gradient-orientation descriptor is clearly above chance.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import scipy.io
from PIL import Image

__all__ = ['DATASETS', 'DEFAULT_SIZE', 'DEFAULT_NUM_IDS', 'make_sysu', 'sysu_split_images',
           'make_regdb', 'make_llcm', 'synthesize', 'parse_size', 'main']

DATASETS = ('sysu_mm01', 'regdb', 'llcm')
DEFAULT_SIZE = (64, 32)  # (H, W) in pixels
DEFAULT_NUM_IDS = {'sysu_mm01': 60, 'regdb': 24, 'llcm': 24}
# Smallest pid ranges that still give non-empty train and test splits (SYSU also needs a val split).
_MIN_NUM_IDS = {'sysu_mm01': 8, 'regdb': 2, 'llcm': 2}
# Largest pid that fits the on-disk name formats: 4-digit folders (SYSU, LLCM), 5-digit
# frame = 100 pid + k (RegDB).
_MAX_NUM_IDS = {'sysu_mm01': 9999, 'regdb': 999, 'llcm': 9999}
_DATASET_CODE = {'sysu_mm01': 1, 'regdb': 2, 'llcm': 3}
# Keys of the independent random streams, so that e.g. the appearance of pid 7 does not depend on
# num_ids.
(_STREAM_STRUCTURE, _STREAM_IDENTITY, _STREAM_CAMERA, _STREAM_CELL, _STREAM_PERM,
 _STREAM_TRIAL) = range(6)

# Material indices of the person model.
_HAIR, _SKIN, _UPPER_A, _UPPER_B, _LOWER_A, _LOWER_B, _SHOES, _BAG = range(8)
_NUM_MATERIALS = 8
_SUPERSAMPLE = 2
_JPEG_QUALITY = 90
# savemat writes the creation time into the 116-byte text header; a fixed text keeps the file
# byte-identical.
_MAT_HEADER = (b'MATLAB 5.0 MAT-file, Platform: torchreid_vi synthetic, '
               b'Created on: fixed (deterministic)')


# --------------------------------------------------------------------------------------------------
# random streams

def _rng(seed: int, dataset: str, *keys: int) -> np.random.Generator:
    """Independent generator for (seed, dataset, *keys); keys are non-negative ints."""
    return np.random.default_rng(
        np.random.SeedSequence([int(seed), _DATASET_CODE[dataset], *map(int, keys)]))


# --------------------------------------------------------------------------------------------------
# identities

@dataclass
class _Texture:
    # 0 plain, 1 horizontal stripes, 2 vertical stripes, 3 diagonal stripes, 4 checks, 5 dots
    kind: int
    freq: float  # cycles per person height
    angle: float  # radians (diagonal stripes)
    phase: float
    duty: float  # threshold on the sine in [-0.4, 0.4]: stripe width ratio


@dataclass
class _Identity:
    """Appearance of one person. Lengths are in units of the person's height (0 = top of head,
    1 = soles)."""
    head_r: float
    width: float  # half shoulder width
    waist: float  # half waist width
    torso_end: float
    arm_w: float
    arm_len: float
    leg_w: float  # half width of one leg
    leg_gap: float  # half gap between the legs
    long_sleeves: bool
    lower_kind: int  # 0 trousers, 1 shorts, 2 skirt
    hair_len: float  # 0 = short hair
    hair_front: float  # fraction of the head radius covered by hair above the face centre
    bag_kind: int  # 0 none, 1 shoulder bag with strap, 2 hand bag
    bag_side: int  # -1 / +1 in body coordinates
    bag_w: float
    bag_h: float
    bag_top: float
    upper: _Texture
    lower: _Texture
    rgb: np.ndarray  # (8, 3) float32 visible colour per material, in [0, 1]
    ir: np.ndarray  # (8,) float32 hidden near-infrared reflectance per material, in [0, 1]
    emission: np.ndarray  # (8,) float32 thermal emission per material (RegDB), in [0, 1]


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB; inputs (...,) in [0, 1], output (..., 3)."""
    h = np.asarray(h, np.float64) % 1.0
    i = np.floor(h * 6.0).astype(int) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack([np.stack([v, t, p], -1), np.stack([q, v, p], -1), np.stack([p, v, t], -1),
                      np.stack([p, q, v], -1), np.stack([t, p, v], -1), np.stack([v, p, q], -1)], 0)
    return np.take_along_axis(table, i[None, ..., None].repeat(3, -1), 0)[0]


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def _draw_texture(rng: np.random.Generator, probs: Sequence[float]) -> _Texture:
    kind = int(rng.choice(6, p=probs))
    angle = float(rng.choice([-1.0, 1.0]) * rng.uniform(np.radians(25), np.radians(65)))
    return _Texture(kind=kind, freq=float(rng.uniform(5.0, 11.0)), angle=angle,
                    phase=float(rng.uniform(0, 2 * np.pi)), duty=float(rng.uniform(-0.4, 0.4)))


def _draw_identity(rng: np.random.Generator) -> _Identity:
    head_r = rng.uniform(0.055, 0.072)
    width = rng.uniform(0.085, 0.135)
    torso_end = rng.uniform(0.46, 0.56)
    shoulder = _shoulder_line(head_r)
    lower_kind = int(rng.choice(3, p=[0.6, 0.2, 0.2]))
    bag_kind = int(rng.choice(3, p=[0.45, 0.35, 0.2]))
    arm_len = torso_end - shoulder + rng.uniform(0.0, 0.07)

    # Visible colours. Garment yarn B contrasts with yarn A in value so textures are visible in RGB.
    hue = rng.uniform(0, 1, _NUM_MATERIALS)
    sat = rng.uniform(0.15, 0.95, _NUM_MATERIALS)
    val = rng.uniform(0.12, 0.95, _NUM_MATERIALS)
    for a, b in ((_UPPER_A, _UPPER_B), (_LOWER_A, _LOWER_B)):
        step = rng.uniform(0.25, 0.55)
        val[b] = val[a] - step if val[a] - step >= 0.08 or val[a] + step > 0.97 else val[a] + step
        val[b] = np.clip(val[b], 0.06, 0.97)
    hue[_HAIR], sat[_HAIR], val[_HAIR] = (rng.uniform(0.02, 0.12), rng.uniform(0.2, 0.7),
                                          rng.uniform(0.06, 0.6))
    sat[_SHOES], val[_SHOES] = rng.uniform(0.0, 0.4), rng.uniform(0.05, 0.7)
    rgb = _hsv_to_rgb(hue, sat, val)
    tone = rng.uniform()
    rgb[_SKIN] = (1 - tone) * np.array([0.96, 0.80, 0.68]) + tone * np.array([0.42, 0.28, 0.19])

    # Hidden NIR reflectance: partly correlated with brightness, partly a dye property invisible in
    # RGB.
    ir = np.clip(0.45 * _luma(rgb) + 0.55 * rng.uniform(0, 1, _NUM_MATERIALS), 0.04, 0.96)
    ir[_SKIN] = rng.uniform(0.62, 0.85)
    ir[_HAIR] = np.clip(0.25 * _luma(rgb[_HAIR]) + rng.uniform(0.08, 0.5), 0.04, 0.96)
    for a, b in ((_UPPER_A, _UPPER_B), (_LOWER_A, _LOWER_B)):
        if abs(ir[b] - ir[a]) < 0.12:  # push the yarns apart, towards the side with room
            ir[b] = ir[a] - 0.12 if ir[a] > 0.5 else ir[a] + 0.12

    emission = np.empty(_NUM_MATERIALS)
    emission[:] = 0.25 + 0.45 * ir
    emission[_SKIN], emission[_HAIR] = rng.uniform(0.85, 0.97), rng.uniform(0.45, 0.6)
    emission[_SHOES], emission[_BAG] = rng.uniform(0.15, 0.3), rng.uniform(0.08, 0.2)
    for a, b in ((_UPPER_A, _UPPER_B), (_LOWER_A, _LOWER_B)):
        emission[b] = emission[a] + 0.4 * (emission[b] - emission[a])  # clothes blur heat patterns

    upper_probs = [0.3, 0.2, 0.12, 0.12, 0.14, 0.12]
    lower_probs = [0.55, 0.1, 0.1, 0.08, 0.1, 0.07]
    return _Identity(
        head_r=head_r, width=width, waist=width * rng.uniform(0.78, 0.96), torso_end=torso_end,
        arm_w=rng.uniform(0.026, 0.04), arm_len=arm_len, leg_w=rng.uniform(0.033, 0.052),
        leg_gap=rng.uniform(0.0, 0.025), long_sleeves=bool(rng.uniform() < 0.6),
        lower_kind=lower_kind, hair_len=0.0 if rng.uniform() < 0.6 else rng.uniform(0.08, 0.22),
        hair_front=rng.uniform(0.05, 0.5), bag_kind=bag_kind, bag_side=int(rng.choice([-1, 1])),
        bag_w=rng.uniform(0.05, 0.085),
        bag_h=rng.uniform(0.07, 0.13), bag_top=rng.uniform(0.28, 0.40),
        upper=_draw_texture(rng, upper_probs), lower=_draw_texture(rng, lower_probs),
        rgb=rgb.astype(np.float32), ir=ir.astype(np.float32), emission=emission.astype(np.float32))


def _shoulder_line(head_r: float) -> float:
    return 2.05 * head_r + 0.012


# --------------------------------------------------------------------------------------------------
# cameras

@dataclass
class _Camera:
    cam: int
    band: str  # 'rgb' | 'nir' | 'thermal'
    gain: float
    tint: np.ndarray  # (3,) per-channel multipliers (colour temperature); ones for IR
    background: np.ndarray  # (C,) base colour, C = 3 (rgb) or 1 (nir/thermal)
    palette: np.ndarray  # (4, C) clutter colours
    floor: np.ndarray  # (C,)
    noise: float  # sensor noise std, in [0, 1] intensity units
    blur_passes: int
    scale: Tuple[float, float]  # person height / image height
    shift: float  # max horizontal shift, fraction of the image width

    @property
    def modality(self) -> str:
        return 'vis' if self.band == 'rgb' else 'ir'


def _make_camera(rng: np.random.Generator, cam: int, band: str, gain: float, temperature: float,
                 background: Sequence[float], floor: Sequence[float], noise: float) -> _Camera:
    """Camera from a preset, jittered by the seed. ``temperature`` > 0 is warm (red up, blue
    down)."""
    channels = 3 if band == 'rgb' else 1
    background = np.clip(np.asarray(background, np.float64)[:channels]
                         + rng.uniform(-0.05, 0.05, channels), 0, 1)
    floor = np.clip(np.asarray(floor, np.float64)[:channels] + rng.uniform(-0.04, 0.04, channels),
                    0, 1)
    palette = np.clip(background[None] * rng.uniform(0.45, 1.6, (4, channels)), 0, 1)
    t = temperature + rng.uniform(-0.03, 0.03) if band == 'rgb' else 0.0
    return _Camera(cam=cam, band=band, gain=gain * rng.uniform(0.92, 1.08),
                   tint=np.array([1 + t, 1.0, 1 - t], np.float32),
                   background=background.astype(np.float32), palette=palette.astype(np.float32),
                   floor=floor.astype(np.float32), noise=noise,
                   blur_passes={'rgb': 0, 'nir': 1, 'thermal': 2}[band], scale=(0.82, 0.96),
                   shift=0.07)


def _sysu_cameras(seed: int) -> Dict[int, _Camera]:
    presets = {  # cam: (band, gain, temperature, background, floor, noise)
        # indoor room 1, warm light
        1: ('rgb', 0.85, 0.12, (0.62, 0.55, 0.45), (0.45, 0.38, 0.30), 0.02),
        2: ('rgb', 0.75, -0.02, (0.45, 0.50, 0.55), (0.30, 0.30, 0.32), 0.025),  # indoor room 2
        3: ('nir', 1.00, 0.0, (0.18,), (0.12,), 0.045),  # room 2 in the dark, NIR illuminator
        # outdoor gate, daylight
        4: ('rgb', 1.10, -0.10, (0.70, 0.72, 0.75), (0.50, 0.50, 0.50), 0.02),
        5: ('rgb', 1.00, 0.04, (0.35, 0.50, 0.30), (0.45, 0.40, 0.35), 0.02),  # outdoor garden
        6: ('nir', 1.00, 0.0, (0.40,), (0.30,), 0.035),  # outdoor passage
    }
    return {cam: _make_camera(_rng(seed, 'sysu_mm01', _STREAM_CAMERA, cam), cam, *p)
            for cam, p in presets.items()}


def _regdb_cameras(seed: int) -> Dict[int, _Camera]:
    return {1: _make_camera(_rng(seed, 'regdb', _STREAM_CAMERA, 1), 1, 'rgb', 0.9, 0.05,
                            (0.55, 0.55, 0.5), (0.4, 0.4, 0.38), 0.02),
            2: _make_camera(_rng(seed, 'regdb', _STREAM_CAMERA, 2), 2, 'thermal', 1.0, 0.0,
                            (0.12,), (0.2,), 0.03)}


def _llcm_cameras(seed: int) -> Dict[Tuple[str, int], _Camera]:
    """LLCM: 9 cameras, each recording low-light visible and NIR; keyed by (modality, cam)."""
    cameras = {}
    for cam in range(1, 10):
        rng = _rng(seed, 'llcm', _STREAM_CAMERA, cam)
        background = rng.uniform(0.15, 0.5, 3)
        floor = rng.uniform(0.1, 0.4, 3)
        cameras['vis', cam] = _make_camera(rng, cam, 'rgb', rng.uniform(0.35, 0.7),
                                           rng.uniform(0.0, 0.3), background, floor, 0.045)
        cameras['ir', cam] = _make_camera(rng, cam, 'nir', rng.uniform(0.75, 1.05), 0.0,
                                          (rng.uniform(0.1, 0.45),), (rng.uniform(0.1, 0.4),), 0.04)
    return cameras


# --------------------------------------------------------------------------------------------------
# rendering

def _pattern(tex: _Texture, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Yarn-B mask of a texture, bool, broadcast shape of u (n, 1, W) and v (n, H, 1)."""
    w = 2 * np.pi * tex.freq
    if tex.kind == 0:
        return np.zeros(np.broadcast_shapes(u.shape, v.shape), bool)
    if tex.kind == 1:
        return np.broadcast_to(np.sin(w * v + tex.phase) > tex.duty,
                               np.broadcast_shapes(u.shape, v.shape))
    if tex.kind == 2:
        return np.broadcast_to(np.sin(w * u + tex.phase) > tex.duty,
                               np.broadcast_shapes(u.shape, v.shape))
    if tex.kind == 3:
        return np.sin(w * (u * np.cos(tex.angle) + v * np.sin(tex.angle)) + tex.phase) > tex.duty
    prod = np.sin(w * u + tex.phase) * np.sin(w * v + tex.phase)
    return prod > (0.1 * tex.duty if tex.kind == 4 else 0.5 + 0.2 * tex.duty)


def _material_map(idn: _Identity, u: np.ndarray, v: np.ndarray, stride: np.ndarray,
                  spread: np.ndarray, back: np.ndarray) -> np.ndarray:
    """Material index per pixel (-1 = background).

    u: (n, 1, W) horizontal body coordinate (person heights from the body axis, already mirrored);
    v: (n, H, 1) vertical body coordinate (0 = top of the head, 1 = soles);
    stride, spread, back: (n, 1, 1) leg spread, arm spread, back-view flag. Returns int8 (n, H, W).
    """
    shape = np.broadcast_shapes(u.shape, v.shape)
    mat = np.full(shape, -1, np.int8)
    upper = (_UPPER_A + _pattern(idn.upper, u, v)).astype(np.int8)
    lower = (_LOWER_A + _pattern(idn.lower, u, v)).astype(np.int8)
    head_c = 1.05 * idn.head_r
    shoulder = _shoulder_line(idn.head_r)
    te, foot = idn.torso_end, 0.955
    below_waist = np.clip(v - te, 0, None)

    garment_end = {0: foot, 1: te + 0.4 * (foot - te), 2: te}[idn.lower_kind]
    for side in (-1.0, 1.0):  # legs (skin below shorts/skirt), then shoes
        centre = side * (idn.leg_gap + idn.leg_w + stride * below_waist)
        leg = (v >= te) & (v < foot) & (np.abs(u - centre) <= idn.leg_w)
        np.copyto(mat, np.where(v < garment_end, lower, np.int8(_SKIN)), where=leg)
        shoe = ((v >= foot - 0.012) & (v < 1.0)
                & (np.abs(u - centre - side * 0.008) <= 1.15 * idn.leg_w))
        np.copyto(mat, np.int8(_SHOES), where=shoe)
    hips = (v >= te - 0.01) & (v < te + 0.05) & (np.abs(u) <= idn.waist + 0.005)
    np.copyto(mat, lower, where=hips)
    if idn.lower_kind == 2:  # skirt: flared trapezoid over the upper legs
        skirt = ((v >= te) & (v < te + 0.5 * (foot - te))
                 & (np.abs(u) <= idn.waist + 0.35 * (v - te)))
        np.copyto(mat, lower, where=skirt)

    half_width = idn.width + (idn.waist - idn.width) * (v - shoulder) / (te - shoulder)
    torso = (v >= shoulder) & (v < te) & (np.abs(u) <= half_width)
    np.copyto(mat, upper, where=torso)
    sleeve_end = shoulder + (idn.arm_len - 0.03 if idn.long_sleeves else 0.09)
    for side in (-1.0, 1.0):
        centre = side * (idn.width + idn.arm_w / 2 + spread * (v - shoulder))
        arm = ((v >= shoulder + 0.004) & (v < shoulder + idn.arm_len)
               & (np.abs(u - centre) <= idn.arm_w / 2))
        np.copyto(mat, np.where(v < sleeve_end, upper, np.int8(_SKIN)), where=arm)

    neck = ((np.abs(u) <= 0.33 * idn.head_r) & (v >= head_c + 0.6 * idn.head_r)
            & (v < shoulder + 0.01))
    np.copyto(mat, np.int8(_SKIN), where=neck)
    head = (u / (0.82 * idn.head_r)) ** 2 + ((v - head_c) / idn.head_r) ** 2 <= 1.0
    hair_top = v < head_c - idn.hair_front * idn.head_r
    np.copyto(mat, np.where(hair_top | back, np.int8(_HAIR), np.int8(_SKIN)), where=head)
    # long hair: over the back in back views, strands beside the face in front views
    if idn.hair_len > 0:
        band = (v >= head_c) & (v < head_c + idn.head_r + idn.hair_len)
        behind = band & (np.abs(u) <= 0.85 * idn.head_r) & back
        strands = (v >= head_c - 0.2 * idn.head_r) & (v < head_c + idn.hair_len) & ~back & \
                  (np.abs(u) >= 0.6 * idn.head_r) & (np.abs(u) <= 0.95 * idn.head_r)
        np.copyto(mat, np.int8(_HAIR), where=behind | strands)

    if idn.bag_kind == 1:  # shoulder bag hanging at the side, strap across the body
        inner = idn.width + 0.3 * idn.arm_w
        side_u = u * idn.bag_side
        bag = ((side_u >= inner) & (side_u < inner + idn.bag_w) & (v >= idn.bag_top)
               & (v < idn.bag_top + idn.bag_h))
        u0, u1 = -0.6 * idn.width, inner + idn.bag_w / 2
        strap_u = u0 + (u1 - u0) * (v - shoulder) / (idn.bag_top - shoulder)
        strap = (np.abs(side_u - strap_u) <= 0.009) & (v >= shoulder) & (v < idn.bag_top)
        np.copyto(mat, np.int8(_BAG), where=bag | strap)
    elif idn.bag_kind == 2:  # hand bag below the hand
        hand = shoulder + idn.arm_len - 0.02
        side_u = u * idn.bag_side
        bag = (side_u >= idn.width - 0.01) & (side_u < idn.width - 0.01 + idn.bag_w) & \
              (v >= hand) & (v < hand + idn.bag_h)
        np.copyto(mat, np.int8(_BAG), where=bag)
    return mat


def _blur(img: np.ndarray, passes: int) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur over axes 1 and 2 of (n, H, W[, C]), edge-replicated."""
    for _ in range(passes):
        for axis in (1, 2):
            pad = [(0, 0)] * img.ndim
            pad[axis] = (1, 1)
            p = np.pad(img, pad, mode='edge')
            lo = np.take(p, np.arange(0, img.shape[axis]), axis)
            mid = np.take(p, np.arange(1, img.shape[axis] + 1), axis)
            hi = np.take(p, np.arange(2, img.shape[axis] + 2), axis)
            img = 0.25 * lo + 0.5 * mid + 0.25 * hi
    return img


def _render_cell(idn: _Identity, camera: _Camera, n: int, size: Tuple[int, int],
                 rng: np.random.Generator) -> np.ndarray:
    """n images of one identity in one camera: uint8 (n, H, W, 3) for visible, (n, H, W) gray
    for IR.

    Every supersampled pixel gets a row of a per-image colour table (8 materials, then the
    background rows of ``_background_labels``) and a brightness multiplier (body shading x gain on
    the person, a vertical gradient on the background); one gather and one product make the image.
    """
    H, W = size
    Hs, Ws = H * _SUPERSAMPLE, W * _SUPERSAMPLE
    f32 = np.float32
    # output-pixel units, (1, Hs, 1)
    ys = ((np.arange(Hs, dtype=f32) + 0.5) / _SUPERSAMPLE)[None, :, None]
    xs = ((np.arange(Ws, dtype=f32) + 0.5) / _SUPERSAMPLE)[None, None, :]  # (1, 1, Ws)

    def per_image(x):  # (n,) -> (n, 1, 1) float32
        return np.asarray(x, f32)[:, None, None]

    person_h = per_image(rng.uniform(*camera.scale, n) * H)
    top = (H - person_h) / 2 + per_image(rng.uniform(-0.8, 0.8, n)) * (H - person_h) / 2
    centre_x = W / 2 + per_image(rng.uniform(-camera.shift, camera.shift, n) * W)
    mirror = per_image(np.where(rng.uniform(size=n) < 0.5, -1.0, 1.0))
    back = (rng.uniform(size=n) < 0.4)[:, None, None]
    stride = per_image(rng.uniform(0.0, 0.1, n))
    spread = per_image(rng.uniform(-0.03, 0.12, n))
    light = per_image(rng.uniform(-1, 1, n))
    gain = per_image(camera.gain * np.exp(rng.normal(0, 0.12, n)))

    v = (ys - top) / person_h  # (n, Hs, 1)
    u = (xs - centre_x) / person_h * mirror  # (n, 1, Ws)
    mat = _material_map(idn, u, v, stride, spread, back)
    body_half = f32(idn.width + idn.arm_w + 0.02)
    lateral = (np.minimum((u / body_half) ** 2, 1) * f32(0.28)
               - f32(0.08) * light * u * mirror / body_half)
    shading = np.clip(f32(1.0) - lateral - f32(0.1) * v, 0.4, 1.2)  # (n, Hs, Ws)

    if camera.band == 'rgb':
        tint = camera.tint * (1 + rng.normal(0, 0.03, (n, 1, 3))).astype(f32)
        materials = idn.rgb[None] * tint  # (n, 8, 3)
        person_light = shading * gain
    elif camera.band == 'nir':
        materials = np.broadcast_to(idn.ir[None, :, None], (n, _NUM_MATERIALS, 1))
        person_light = shading * gain
    else:  # thermal: heat does not depend on the light direction, only weakly on the body curvature
        materials = np.broadcast_to(idn.emission[None, :, None], (n, _NUM_MATERIALS, 1))
        person_light = gain * (f32(0.85) + f32(0.15) * shading)
    bg_label, bg_colours = _background_labels(camera, n, H, W, ys, xs, rng)
    table = np.concatenate([materials, bg_colours], axis=1).astype(f32)  # (n, 8 + 5, C)
    is_person = mat >= 0
    row = np.where(is_person, mat, bg_label + np.int8(_NUM_MATERIALS))
    brightness = np.where(is_person, person_light, f32(1.0) - f32(0.2) * ys / H)
    # a bench/railing over the bottom of the image
    occluded = (rng.uniform(size=n) < 0.06)[:, None, None]
    occ_top = per_image(rng.uniform(0.78, 0.9, n) * H)
    occluder = occluded & (ys >= occ_top)
    np.copyto(row, np.int8(_NUM_MATERIALS + 1), where=occluder)  # in the first clutter colour
    np.copyto(brightness, f32(1.0), where=occluder)
    flat_row = (np.arange(n, dtype=np.intp) * table.shape[1])[:, None, None] + row
    img = np.take(table.reshape(-1, table.shape[2]), flat_row, axis=0)  # (n, Hs, Ws, C)
    img *= brightness[..., None]

    C = img.shape[-1]
    S = _SUPERSAMPLE  # box downsampling back to (H, W)
    img = sum(img[:, i::S, j::S] for i in range(S) for j in range(S)) * f32(1.0 / S ** 2)
    img = _blur(img, camera.blur_passes)
    img += rng.standard_normal(img.shape, dtype=f32) * f32(camera.noise)
    out = np.clip(np.rint(img * f32(255.0)), 0, 255).astype(np.uint8)
    return out if C == 3 else out[..., 0]


def _background_labels(camera: _Camera, n: int, H: int, W: int, ys: np.ndarray, xs: np.ndarray,
                       rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Camera background as labels int8 (n, Hs, Ws) and colours float32 (n, 5, C).

    Label 0 is the base colour, 1..3 three clutter boxes (poles, doors) in palette colours, 4 the
    floor band.
    """
    C = camera.background.shape[0]
    labels = np.zeros((n, ys.shape[1], xs.shape[2]), np.int8)
    colours = np.empty((n, 5, C), np.float32)
    colours[:, 0] = camera.background
    colours[:, 4] = camera.floor
    for k in range(1, 4):
        x0 = rng.uniform(-0.1, 1.0, n)[:, None, None] * W
        w = rng.uniform(0.06, 0.3, n)[:, None, None] * W
        y0 = rng.uniform(-0.2, 0.6, n)[:, None, None] * H
        h = rng.uniform(0.2, 1.0, n)[:, None, None] * H
        colours[:, k] = camera.palette[rng.integers(len(camera.palette), size=n)]
        np.copyto(labels, np.int8(k),
                  where=((xs >= x0) & (xs < x0 + w)) & ((ys >= y0) & (ys < y0 + h)))
    floor_y = rng.uniform(0.82, 0.95, n)[:, None, None] * H
    np.copyto(labels, np.int8(4), where=ys >= floor_y)
    return labels, colours


# --------------------------------------------------------------------------------------------------
# file writing

def _encode(pixels: np.ndarray, fmt: str, l_mode: bool = False) -> bytes:
    """Encode one image. pixels: (H, W, 3) uint8 RGB, or (H, W) gray (replicated to RGB unless
    l_mode)."""
    if pixels.ndim == 2 and not l_mode:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    image = Image.fromarray(pixels, 'L' if pixels.ndim == 2 else 'RGB')
    buffer = io.BytesIO()
    if fmt == 'JPEG':
        image.save(buffer, format='JPEG', quality=_JPEG_QUALITY)
    else:
        image.save(buffer, format=fmt)
    return buffer.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _write_mat(path: Path, variables: dict) -> None:
    """scipy.io.savemat with a fixed header text (the default one holds the creation time)."""
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, variables)
    raw = bytearray(buffer.getvalue())
    raw[:116] = _MAT_HEADER.ljust(116, b' ')
    _write_bytes(path, bytes(raw))


def _write_text(path: Path, lines: Sequence[str], trailing_newline: bool = True) -> None:
    text = '\n'.join(lines) + ('\n' if trailing_newline and lines else '')
    _write_bytes(path, text.encode('ascii'))


def _prepare_root(root, dataset: str, exist_ok: bool) -> Path:
    root = Path(os.path.abspath(os.fspath(root)))
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f'{dataset}: dataset root {root} exists and is not a directory')
    if root.is_dir() and any(root.iterdir()) and not exist_ok:
        raise FileExistsError(f'{dataset}: dataset root {root} is not empty; the generator '
                              f'writes a complete dataset there and would mix with the old files. '
                              f'Use an empty or new folder (or exist_ok=True / --exist-ok to '
                              f'overwrite file by file).')
    root.mkdir(parents=True, exist_ok=True)
    return root


def _summary(records: Sequence[Tuple[int, int, str]]) -> dict:
    """{'vis': {'ids', 'num_images', 'cams'}, 'ir': {...}} from (pid, cam, modality) records."""
    out = {}
    for modality in ('vis', 'ir'):
        sel = [(pid, cam) for pid, cam, m in records if m == modality]
        out[modality] = {'ids': sorted({int(p) for p, _ in sel}), 'num_images': len(sel),
                         'cams': sorted({int(c) for _, c in sel})}
    return out


def _check_args(dataset: str, seed, num_ids, size) -> Tuple[int, int, Tuple[int, int]]:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f'{dataset}: seed must be a non-negative int, got {seed!r}')
    if num_ids is None:
        num_ids = DEFAULT_NUM_IDS[dataset]
    if isinstance(num_ids, bool) or not isinstance(num_ids, (int, np.integer)) or \
            not _MIN_NUM_IDS[dataset] <= num_ids <= _MAX_NUM_IDS[dataset]:
        raise ValueError(f'{dataset}: num_ids must be an int in [{_MIN_NUM_IDS[dataset]}, '
                         f'{_MAX_NUM_IDS[dataset]}], got {num_ids!r}')
    size = parse_size(size)
    return int(seed), int(num_ids), size


def parse_size(size) -> Tuple[int, int]:
    """'64x32' or (64, 32) -> (H, W); both at least 16 x 8 pixels."""
    if isinstance(size, str):
        parts = size.lower().split('x')
        try:
            size = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f'size must be "HxW" with integer H and W (e.g. "64x32"), '
                             f'got {size!r}') from None
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) for s in size) or size[0] < 16 \
            or size[1] < 8:
        raise ValueError(f'size must be (H, W) with H >= 16 and W >= 8 pixels, got {size!r}')
    return int(size[0]), int(size[1])


# --------------------------------------------------------------------------------------------------
# SYSU-MM01

def _sysu_structure(seed: int, num_ids: int, num_test_ids: Optional[int] = None) -> dict:
    """Which pids exist, their split and their (cam -> number of images) cells.

    ``num_test_ids``: size of the test split (default ``None``: half of the available ids). The
    random draws do not depend on it, so the default gives the same dataset as before it existed.
    """
    rng = _rng(seed, 'sysu_mm01', _STREAM_STRUCTURE)
    pids = np.arange(1, num_ids + 1)
    n_gaps = int(round(num_ids / 6))  # 10 of 60: pids without any folder
    n_single = int(round(num_ids / 30))  # 2 of 60: pids seen by one camera only, in no id list
    order = rng.permutation(pids)
    gaps = sorted(int(p) for p in order[:n_gaps])
    single = sorted(int(p) for p in order[n_gaps:n_gaps + n_single])
    available = sorted(int(p) for p in order[n_gaps + n_single:])
    n_val = max(1, int(round(len(available) / 12)))
    if num_test_ids is None:
        n_test = max(1, len(available) // 2)
    else:
        n_test = int(num_test_ids)
        if not 1 <= n_test <= len(available) - n_val - 1:
            raise ValueError(f'sysu_mm01: num_test_ids must be in '
                             f'[1, {len(available) - n_val - 1}] with num_ids={num_ids} '
                             f'({len(available)} available ids, {n_val} val, at least 1 train), '
                             f'got {num_test_ids!r}')
    shuffled = [int(p) for p in rng.permutation(available)]
    test = sorted(shuffled[:n_test])
    val = sorted(shuffled[n_test:n_test + n_val])
    train = sorted(shuffled[n_test + n_val:])

    cells: Dict[int, Dict[int, int]] = {}  # pid -> {cam: n}
    test_set = set(test)
    for pid in available:
        cams = [1, 2, 3] + [c for c in (4, 5, 6)
                            if rng.uniform() >= 0.25 or (c == 6 and pid in test_set)]
        cells[pid] = {c: int(rng.integers(12, 21)) for c in cams}
    for pid in single:
        cells[pid] = {int(rng.integers(1, 7)): int(rng.integers(12, 21))}

    # The 7-image test cell (exercises min(10, n) in multi-shot galleries).
    candidates = [(pid, c) for pid in test for c in (4, 5) if c in cells[pid]]
    if candidates:
        short_pid, short_cam = candidates[int(rng.integers(len(candidates)))]
    else:
        short_pid, short_cam = test[int(rng.integers(len(test)))], 5
    cells[short_pid][short_cam] = 7

    # N_c = largest pid with images in camera c; make sure at least one camera is shorter than the
    # largest pid.
    largest = max(cells)
    if all(c in cells[largest] for c in range(1, 7)):
        drop = 4 if (largest, 4) != (short_pid, short_cam) else 5
        del cells[largest][drop]
    return {'gaps': gaps, 'single': single, 'available': available, 'train': train, 'val': val,
            'test': test, 'cells': cells, 'short_cell': (short_pid, short_cam)}


def _sysu_check(seed, num_ids, size, num_test_ids) -> Tuple[int, int, Tuple[int, int], dict]:
    seed, num_ids, size = _check_args('sysu_mm01', seed, num_ids, size)
    if num_test_ids is not None and (isinstance(num_test_ids, bool)
                                     or not isinstance(num_test_ids, (int, np.integer))):
        raise ValueError(f'sysu_mm01: num_test_ids must be an int or None, got {num_test_ids!r}')
    return seed, num_ids, size, _sysu_structure(seed, num_ids, num_test_ids)


def _sysu_files(seed: int, st: dict, size: Tuple[int, int], pids: Sequence[int]):
    """Yield ``(pid, cam, k, modality, jpeg bytes)`` of every image of ``pids`` (k = 1..n), exactly
    the bytes :func:`make_sysu` writes to ``cam{cam}/{pid:04d}/{k:04d}.jpg``."""
    cameras = _sysu_cameras(seed)
    cells = st['cells']
    l_mode = (st['test'][0], 3, 1)  # the first query image of the first test pid
    for pid in sorted(pids):
        idn = _draw_identity(_rng(seed, 'sysu_mm01', _STREAM_IDENTITY, pid))
        for cam in sorted(cells[pid]):
            n = cells[pid][cam]
            camera = cameras[cam]
            pixels = _render_cell(idn, camera, n, size,
                                  _rng(seed, 'sysu_mm01', _STREAM_CELL, cam, pid))
            for k in range(1, n + 1):
                yield pid, cam, k, camera.modality, _encode(pixels[k - 1], 'JPEG',
                                                            l_mode=(pid, cam, k) == l_mode)


def _sysu_chunk(job) -> list:
    """Worker of :func:`_sysu_files_parallel`: the files of one chunk of pids, as a list."""
    seed, st, size, pids = job
    return list(_sysu_files(seed, st, size, pids))


def _sysu_files_parallel(seed: int, st: dict, size: Tuple[int, int], pids: Sequence[int],
                         workers: int):
    """:func:`_sysu_files` over ``workers`` forked processes, in the same order with the same bytes
    (every pid has its own random streams). Serial where ``fork`` is unavailable or
    ``workers <= 1``."""
    import multiprocessing
    pids = sorted(pids)
    if workers <= 1 or len(pids) < 2 or 'fork' not in multiprocessing.get_all_start_methods():
        yield from _sysu_files(seed, st, size, pids)
        return
    chunk = max(1, len(pids) // (8 * workers))  # small chunks: balanced, bounded memory in flight
    jobs = [(seed, st, size, pids[i:i + chunk]) for i in range(0, len(pids), chunk)]
    with multiprocessing.get_context('fork').Pool(workers) as pool:  # numpy only in the children
        for files in pool.imap(_sysu_chunk, jobs):
            yield from files


def sysu_split_images(split: str, seed: int = 0, num_ids: Optional[int] = None,
                      size=DEFAULT_SIZE, *,
                      num_test_ids: Optional[int] = None) -> Dict[Tuple[int, int], List[bytes]]:
    """The JPEG files of one split (``'train'``, ``'val'`` or ``'test'``) of the SYSU-MM01 that
    :func:`make_sysu` would write with the same arguments, in memory:
    ``{(pid, cam): [bytes of 0001.jpg, 0002.jpg, ...]}``.

    Every identity and cell has its own random stream, so the other pids need not be drawn: a check
    on the images of a large dataset's test split (e.g. the demo's) costs only that split.
    """
    if split not in ('train', 'val', 'test'):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    seed, num_ids, size, st = _sysu_check(seed, num_ids, size, num_test_ids)
    out: Dict[Tuple[int, int], List[bytes]] = {}
    for pid, cam, _k, _modality, data in _sysu_files(seed, st, size, st[split]):
        out.setdefault((pid, cam), []).append(data)
    return out


def make_sysu(root, seed: int = 0, num_ids: Optional[int] = None, size=DEFAULT_SIZE, *,
              exist_ok: bool = False, num_test_ids: Optional[int] = None, workers: int = 1) -> dict:
    """Write a synthetic SYSU-MM01 under ``root`` (the dataset root) and return its
    manifest (module docstring).

    ``num_test_ids``: identities in the test split (default: half of the available ids); the rest of
    the available ids are train + val. Fixing it lets ``num_ids`` grow the training set without
    growing the gallery.
    ``workers``: processes that render the images (forked where the platform can; the files are
    byte-identical whatever the number).
    """
    # before anything is written
    seed, num_ids, size, st = _sysu_check(seed, num_ids, size, num_test_ids)
    root = _prepare_root(root, 'sysu_mm01', exist_ok)
    cells = st['cells']
    l_mode = (st['test'][0], 3, 1)  # the first query image of the first test pid
    records: Dict[int, List[Tuple[int, int, str]]] = {}  # pid -> (pid, cam, modality) per image
    for pid, cam, k, modality, data in _sysu_files_parallel(seed, st, size, sorted(cells),
                                                            int(workers)):
        folder = root / f'cam{cam}' / f'{pid:04d}'
        if k == 1:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f'{k:04d}.jpg').write_bytes(data)
        records.setdefault(pid, []).append((pid, cam, modality))

    exp = root / 'exp'
    newline = {'train': True, 'val': False, 'test': True, 'available': False}
    for name in ('train', 'val', 'test', 'available'):
        ids = st[name]
        _write_text(exp / f'{name}_id.txt', [','.join(str(p) for p in ids)],
                    trailing_newline=newline[name])
        _write_mat(exp / f'{name}_id.mat', {'id': np.asarray(ids, np.uint16)[None, :]})

    perm_manifest: Dict[str, Dict[str, list]] = {}
    num_pids_per_cam: Dict[str, int] = {}
    outer = np.empty((6, 1), dtype=object)
    for cam in range(1, 7):
        present = sorted(pid for pid in cells if cam in cells[pid])
        n_c = present[-1] if present else 0
        cell = np.empty((n_c, 1), dtype=object)
        for pid in range(1, n_c + 1):
            cell[pid - 1, 0] = np.zeros((10, 0), np.uint8)
        rng = _rng(seed, 'sysu_mm01', _STREAM_PERM, cam)
        perm_manifest[str(cam)] = {}
        for pid in present:
            n = cells[pid][cam]
            rows = np.stack([rng.permutation(n) + 1 for _ in range(10)]).astype(np.uint8)
            cell[pid - 1, 0] = rows
            perm_manifest[str(cam)][str(pid)] = rows.tolist()
        outer[cam - 1, 0] = cell
        num_pids_per_cam[str(cam)] = n_c
    _write_mat(exp / 'rand_perm_cam.mat', {'rand_perm_cam': outer})

    def split(pids, cams):
        return [r for p in pids for r in records.get(p, []) if r[1] in cams]

    train_ids = sorted(st['train'] + st['val'])
    return {
        'dataset': 'sysu_mm01', 'root': str(root), 'seed': seed, 'size': list(size),
        'splits': {'train': _summary(split(train_ids, range(1, 7))),
                   'query': _summary(split(st['test'], (3, 6))),
                   'gallery': _summary(split(st['test'], (1, 2, 4, 5)))},
        'ids': {'train': st['train'], 'val': st['val'], 'test': st['test'],
                'available': st['available'], 'with_images': sorted(cells),
                'single_camera': st['single'], 'gaps': st['gaps']},
        'id_file_trailing_newline': newline,
        'cells': {str(c): {str(p): cells[p][c] for p in sorted(cells) if c in cells[p]}
                  for c in range(1, 7)},
        'short_cell': {'pid': st['short_cell'][0], 'cam': st['short_cell'][1], 'num_images': 7},
        'perm': perm_manifest, 'perm_num_pids': num_pids_per_cam,
        'l_mode_file': f'cam{l_mode[1]}/{l_mode[0]:04d}/{l_mode[2]:04d}.jpg',
    }


# --------------------------------------------------------------------------------------------------
# RegDB

_REGDB_IMAGES_PER_PID = 10
_REGDB_TRIALS = 10


def _regdb_name(pid: int, k: int, modality_letter: str) -> str:
    sex = 'female' if pid % 2 == 1 else 'male'
    view = 'back' if pid % 3 == 0 else 'front'
    return f'{sex}_{view}_{modality_letter}_{100 * pid + k:05d}_{pid}.bmp'


def make_regdb(root, seed: int = 0, num_ids: Optional[int] = None, size=DEFAULT_SIZE, *,
               exist_ok: bool = False) -> dict:
    """Write a synthetic RegDB under ``root`` and return its manifest (module docstring)."""
    seed, num_ids, size = _check_args('regdb', seed, num_ids, size)
    root = _prepare_root(root, 'regdb', exist_ok)
    cameras = _regdb_cameras(seed)
    n = _REGDB_IMAGES_PER_PID
    pids = list(range(1, num_ids + 1))
    l_mode_file = f'Thermal/1/{_regdb_name(1, 0, "t")}'
    paths: Dict[Tuple[int, str], List[str]] = {}  # (pid, 'vis'|'ir') -> root-relative paths
    for pid in pids:
        idn = _draw_identity(_rng(seed, 'regdb', _STREAM_IDENTITY, pid))
        for cam, folder, letter in ((1, 'Visible', 'v'), (2, 'Thermal', 't')):
            pixels = _render_cell(idn, cameras[cam], n, size,
                                  _rng(seed, 'regdb', _STREAM_CELL, cam, pid))
            rels = [f'{folder}/{pid}/{_regdb_name(pid, k, letter)}' for k in range(n)]
            (root / folder / str(pid)).mkdir(parents=True, exist_ok=True)
            for rel, image in zip(rels, pixels):
                (root / rel).write_bytes(_encode(image, 'BMP', l_mode=rel == l_mode_file))
            paths[pid, cameras[cam].modality] = rels

    trials, trial_pids = {}, {}
    n_train = num_ids // 2
    for t in range(1, _REGDB_TRIALS + 1):
        order = [int(p) for p in _rng(seed, 'regdb', _STREAM_TRIAL, t).permutation(pids)]
        halves = {'train': order[:n_train], 'test': order[n_train:]}
        for part, half in halves.items():
            for modality, name in (('vis', 'visible'), ('ir', 'thermal')):
                lines = [f'{rel} {label}' for label, pid in enumerate(half)
                         for rel in paths[pid, modality]]
                _write_text(root / 'idx' / f'{part}_{name}_{t}.txt', lines)
        trial_pids[str(t)] = halves

        def records(half, modalities):
            return [(pid, 1 if m == 'vis' else 2, m) for pid in half for m in modalities
                    for _ in range(n)]

        trials[str(t)] = {'train': _summary(records(halves['train'], ('vis', 'ir'))),
                          'query': _summary(records(halves['test'], ('ir',))),
                          'gallery': _summary(records(halves['test'], ('vis',)))}
    return {'dataset': 'regdb', 'root': str(root), 'seed': seed, 'size': list(size),
            'trials': trials, 'trial_pids': trial_pids, 'ids': pids,
            'images_per_pid': {'vis': n, 'ir': n},
            'l_mode_file': l_mode_file}


# --------------------------------------------------------------------------------------------------
# LLCM

def make_llcm(root, seed: int = 0, num_ids: Optional[int] = None, size=DEFAULT_SIZE, *,
              exist_ok: bool = False) -> dict:
    """Write a synthetic LLCM under ``root`` and return its manifest (module docstring)."""
    seed, num_ids, size = _check_args('llcm', seed, num_ids, size)
    root = _prepare_root(root, 'llcm', exist_ok)
    cameras = _llcm_cameras(seed)
    n_train = num_ids // 2
    train_ids = list(range(1, n_train + 1))
    test_ids = list(range(n_train + 1, num_ids + 1))
    rng = _rng(seed, 'llcm', _STREAM_STRUCTURE)
    # modality -> pid -> cam -> n
    cells: Dict[str, Dict[int, Dict[int, int]]] = {'vis': {}, 'ir': {}}
    for pid in range(1, num_ids + 1):
        for modality in ('vis', 'ir'):
            allowed = [c for c in range(1, 10)
                       if not (modality == 'ir' and pid > n_train and c == 3)]
            cams = sorted(int(c) for c in rng.choice(allowed, 3, replace=False))
            cells[modality][pid] = {c: int(rng.integers(1, 4)) for c in cams}

    folder = {'vis': 'vis', 'ir': 'nir'}
    entries: Dict[str, List[Tuple[int, int, str]]] = {'vis': [], 'ir': []}  # (pid, cam, rel path)
    l_mode_file = None
    for pid in range(1, num_ids + 1):
        idn = _draw_identity(_rng(seed, 'llcm', _STREAM_IDENTITY, pid))
        for code, modality in enumerate(('vis', 'ir')):
            for cam, n in sorted(cells[modality][pid].items()):
                cell_rng = _rng(seed, 'llcm', _STREAM_CELL, cam, pid, code)
                pixels = _render_cell(idn, cameras[modality, cam], n, size, cell_rng)
                frames = np.sort(cell_rng.choice(np.arange(1, 10000), n, replace=False))
                # unique per (pid, cam, modality), 6 digits for pid <= 9999
                seq = 100 * pid + 10 * cam + code
                test_folder = root / f'test_{folder[modality]}' / f'cam{cam}' / f'{pid:04d}'
                (root / folder[modality] / f'{pid:04d}').mkdir(parents=True, exist_ok=True)
                if pid > n_train:
                    test_folder.mkdir(parents=True, exist_ok=True)
                for image, frame in zip(pixels, frames):
                    name = f'{pid:04d}_c{cam:02d}_s{seq:06d}_f{frame}_{folder[modality]}.jpg'
                    rel = f'{folder[modality]}/{pid:04d}/{name}'
                    # first NIR image of train pid 1
                    l_mode = modality == 'ir' and l_mode_file is None
                    data = _encode(image, 'JPEG', l_mode=l_mode)
                    l_mode_file = rel if l_mode else l_mode_file
                    (root / rel).write_bytes(data)
                    if pid > n_train:  # test images are also grouped by camera, same name and bytes
                        (test_folder / name).write_bytes(data)
                    entries[modality].append((pid, cam, rel))

    labels = {pid: i for i, pid in enumerate(train_ids)}
    for modality in ('vis', 'ir'):
        rows = sorted(entries[modality])
        _write_text(root / 'idx' / f'train_{folder[modality]}.txt',
                    [f'{rel} {labels[pid]}' for pid, _, rel in rows if pid <= n_train])
        _write_text(root / 'idx' / f'test_{folder[modality]}.txt',
                    [f'{rel} {pid}' for pid, _, rel in rows if pid > n_train])
    _write_text(root / 'idx' / 'test_id.txt', [','.join(str(p) for p in test_ids)])

    def summary(test: bool, modalities):
        return _summary([(pid, cam, m) for m in modalities for pid, cam, _ in entries[m]
                         if (pid > n_train) == test])

    return {'dataset': 'llcm', 'root': str(root), 'seed': seed, 'size': list(size),
            'splits': {'train': summary(False, ('vis', 'ir')), 'query': summary(True, ('ir',)),
                       'gallery': summary(True, ('vis',))},
            'train_ids': train_ids, 'test_ids': test_ids,
            'cells': {m: {str(p): {str(c): k for c, k in cells[m][p].items()} for p in cells[m]}
                      for m in cells},
            'l_mode_file': l_mode_file}


# --------------------------------------------------------------------------------------------------
# dispatch and CLI

_MAKERS = {'sysu_mm01': make_sysu, 'regdb': make_regdb, 'llcm': make_llcm}


def synthesize(dataset: str, root, seed: int = 0, num_ids: Optional[int] = None,
               size=DEFAULT_SIZE, *, exist_ok: bool = False, num_test_ids: Optional[int] = None,
               workers: int = 1) -> dict:
    """Dispatch to make_sysu / make_regdb / make_llcm by name ('sysu_mm01' | 'regdb' | 'llcm').

    ``num_test_ids`` and ``workers`` are SYSU-MM01 options (see :func:`make_sysu`).
    """
    if dataset not in _MAKERS:
        raise ValueError(f'unknown dataset {dataset!r}; expected one of {", ".join(DATASETS)}')
    if dataset == 'sysu_mm01':
        return make_sysu(root, seed=seed, num_ids=num_ids, size=size, exist_ok=exist_ok,
                         num_test_ids=num_test_ids, workers=workers)
    for name, value, default in (('num_test_ids', num_test_ids, None), ('workers', workers, 1)):
        if value != default:
            raise ValueError(f'{dataset}: {name} is a sysu_mm01 option (RegDB and LLCM split '
                             f'their ids in halves and are small), got {name}={value!r}')
    return _MAKERS[dataset](root, seed=seed, num_ids=num_ids, size=size, exist_ok=exist_ok)


def _is_inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m torchreid_vi.tools.synthesize',
                                     description='Write a synthetic SYSU-MM01 / RegDB / LLCM '
                                                 'dataset in the real on-disk layout.')
    parser.add_argument('--dataset', required=True, choices=DATASETS)
    parser.add_argument('--root', required=True,
                        help='dataset root to create (e.g. /tmp/data/SYSU-MM01)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--num-ids', type=int, default=None,
                        help='pid range 1..N (defaults: ' +
                             ', '.join(f'{k} {v}' for k, v in DEFAULT_NUM_IDS.items()) + ')')
    parser.add_argument('--num-test-ids', type=int, default=None,
                        help='sysu_mm01 only: identities in the test split (default: half of '
                             'the available ids)')
    parser.add_argument('--workers', type=int, default=1,
                        help='sysu_mm01 only: processes rendering the images (same bytes '
                             'whatever the number)')
    parser.add_argument('--size', default='{}x{}'.format(*DEFAULT_SIZE),
                        help='image size HxW (default 64x32)')
    parser.add_argument('--manifest', default=None,
                        help='write the manifest JSON here (outside --root)')
    parser.add_argument('--exist-ok', action='store_true',
                        help='write into a non-empty root (file by file)')
    args = parser.parse_args(argv)
    root = Path(os.path.abspath(args.root))
    manifest_path = Path(os.path.abspath(args.manifest)) if args.manifest else None
    if manifest_path is not None and _is_inside(manifest_path, root):
        parser.error(f'--manifest {args.manifest} is inside --root {args.root}; the root must hold '
                     f'exactly the dataset layout, put the manifest elsewhere')
    try:
        size = parse_size(args.size)
        start = time.perf_counter()
        manifest = synthesize(args.dataset, root, seed=args.seed, num_ids=args.num_ids, size=size,
                              exist_ok=args.exist_ok, num_test_ids=args.num_test_ids,
                              workers=args.workers)
        seconds = time.perf_counter() - start
    except (ValueError, FileExistsError, NotADirectoryError) as error:
        parser.error(str(error))
    if manifest_path is not None:
        manifest_path.parent.mkdir(parents=True, exist_ok=True)
        manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + '\n')
    groups = manifest['splits'] if 'splits' in manifest else {
        f'trial1/{k}': v for k, v in manifest['trials']['1'].items()}
    print(f'{args.dataset}: wrote {root} in {seconds:.2f} s (seed {args.seed}, '
          f'size {size[0]}x{size[1]})')
    for name, s in groups.items():
        print(f'  {name:14s} vis {len(s["vis"]["ids"]):4d} ids {s["vis"]["num_images"]:6d} '
              f'images cams {s["vis"]["cams"]} | ir {len(s["ir"]["ids"]):4d} ids '
              f'{s["ir"]["num_images"]:6d} images cams {s["ir"]["cams"]}')
    if manifest_path is not None:
        print(f'  manifest: {manifest_path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
