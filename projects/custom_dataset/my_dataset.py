"""An example cross-modal dataset plug-in: ``my_vi``, a simple folder layout.

Layout (under torchreid's data root)::

    my_vi/
      visible/train/<pid>/<cam>_<n>.jpg     e.g. visible/train/7/1_0003.jpg (camera 1)
      visible/test/<pid>/<cam>_<n>.jpg
      infrared/train/<pid>/<cam>_<n>.jpg
      infrared/test/<pid>/<cam>_<n>.jpg

Use it from the command line (the file is imported before anything is built)::

    python projects/custom_dataset/my_dataset.py --root /tmp/reid-data      # writes a toy tree
    python -m torchreid_vi --plugin projects/custom_dataset/my_dataset.py \\
        --config-file projects/custom_dataset/my_dataset.yaml --root /tmp/reid-data

or from Python: ``import`` this file, then build a ``CrossModalImageDataManager`` with
``sources='my_vi'``.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp

from torchreid_vi.data.base import INFRARED, VISIBLE, CrossModalDataset
from torchreid_vi.registry import register_dataset


# ----------------------------------------------------------------------------- the dataset
class MyVIDataset(CrossModalDataset):
    """``my_vi``: visible/infrared × train/test folders of ``<pid>/<cam>_<n>.jpg`` images."""

    name = 'my_vi'
    dataset_dir = 'my_vi'
    layout = 'my_vi/\n  {visible,infrared}/{train,test}/<pid>/<cam>_<n>.jpg'
    layout_markers = ('visible', 'infrared')

    def load_records(self, dataset_root):
        records = {'train': [], 'test': []}
        for modality, folder in ((VISIBLE, 'visible'), (INFRARED, 'infrared')):
            for split in records:
                split_dir = self.require(osp.join(dataset_root, folder, split), f'{split} folder')
                for pid_name in os.listdir(split_dir):
                    pid_dir = osp.join(split_dir, pid_name)
                    for file_name in os.listdir(pid_dir):
                        if file_name.endswith('.jpg'):
                            cam = int(file_name.split('_')[0])
                            records[split].append(
                                (osp.join(pid_dir, file_name), int(pid_name), cam, modality))
        # The base sorts, relabels train pids, validates and caches; query = infrared test
        # images, gallery = visible test images.
        test = records['test']
        return (records['train'], [r for r in test if r[3] == INFRARED],
                [r for r in test if r[3] == VISIBLE])


register_dataset('my_vi', MyVIDataset)


# ----------------------------------------------------------------------------- a toy tree
def write_example_tree(root: str, num_ids: int = 12, images_per_cam: int = 3,
                       size=(64, 32), seed: int = 0) -> str:
    """Write a small ``my_vi`` tree of random images under ``root`` and return its folder.

    Half of the ids train, half test; visible cameras 1 and 2, infrared cameras 3 and 4. Every
    identity has a colour, so a model can learn something; infrared images are its gray version.

    Args:
        root: torchreid's data root (``<root>/my_vi`` is created).
        num_ids: identities (pids 1..num_ids).
        images_per_cam: images per (identity, camera).
        size: (H, W) in pixels.
        seed: random seed.
    """
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    folder = osp.join(root, 'my_vi')
    h, w = size
    for pid in range(1, num_ids + 1):
        split = 'train' if pid <= num_ids // 2 else 'test'
        colour = rng.uniform(40, 215, 3)
        for modality, cams in (('visible', (1, 2)), ('infrared', (3, 4))):
            pid_dir = osp.join(folder, modality, split, str(pid))
            os.makedirs(pid_dir, exist_ok=True)
            for cam in cams:
                for n in range(images_per_cam):
                    pixels = np.clip(colour + rng.normal(0, 30, (h, w, 3)), 0, 255)
                    img = Image.fromarray(pixels.astype(np.uint8))
                    if modality == 'infrared':
                        img = img.convert('L').convert('RGB')
                    img.save(osp.join(pid_dir, f'{cam}_{n:04d}.jpg'))
    return folder


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description='write a toy my_vi tree')
    parser.add_argument('--root', required=True, help='torchreid data root')
    parser.add_argument('--num-ids', type=int, default=12)
    args = parser.parse_args()
    print('wrote', write_example_tree(args.root, num_ids=args.num_ids))
