"""TFDS builder for the synthetic `mmcl_shapes` image-caption dataset.

Everything is generated locally by `generator.make_example`; nothing is
downloaded. Defining the class registers it with TFDS as `mmcl_shapes`.
"""
import contextlib
import dataclasses
import io
import os
import struct
import zlib

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from mmcl.data.shapes import generator

_DESCRIPTION = """\
Procedurally generated images of one or two coloured shapes on a noisy
background, each with several differently worded captions. Labels (shape,
colour, colour-shape combo, size) describe the first object. The colour-shape
pairs in HELDOUT_COMBOS never occur in train but do in validation and test.
Since 1.1.0 every object also has its box (normalised y0, x0, y1, x1 around the
pixels it covers) and a region caption ('red circle'), for referring expressions
and grounded captioning.
"""


def _png_chunk(tag: bytes, data: bytes) -> bytes:
  return (struct.pack('>I', len(data)) + tag + data
          + struct.pack('>I', zlib.crc32(tag + data)))


def encode_png(image: np.ndarray, level: int = 4) -> bytes:
  """Lossless PNG bytes of a uint8 RGB image.

  About twice as fast as TF's encoder for small images, which matters when
  writing tens of thousands of them. Every row uses PNG filter 1 ('Sub':
  difference to the pixel on the left), which suits smooth backgrounds.
  """
  height, width, channels = image.shape
  assert image.dtype == np.uint8 and channels == 3, (image.dtype, image.shape)
  rows = image.reshape(height, width * 3)
  diff = rows.copy()
  diff[:, 3:] -= rows[:, :-3]  # uint8 wrap-around is what PNG specifies.
  filtered = np.concatenate([np.ones((height, 1), np.uint8), diff], axis=1)
  header = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)  # 8-bit RGB.
  return (b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', header)
          + _png_chunk(b'IDAT', zlib.compress(filtered.tobytes(), level))
          + _png_chunk(b'IEND', b''))


@dataclasses.dataclass(eq=False)
class MmclShapesConfig(tfds.core.BuilderConfig):
  """Image size, split sizes and seed of one `mmcl_shapes` variant."""
  image_size: int = 64
  num_train: int = 20_000
  num_validation: int = 1_000
  num_test: int = 2_000
  seed: int = 0


class MmclShapes(tfds.core.GeneratorBasedBuilder):
  """Synthetic coloured shapes with captions, for contrastive learning."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release.',
      '1.1.0': 'Adds objects/bbox and objects/caption (one per object, in drawing order); '
               'every 1.0.0 feature and value is unchanged.',
  }
  BUILDER_CONFIGS = [
      MmclShapesConfig(name='default', description='64 px, 20k train.'),
      MmclShapesConfig(name='px32', image_size=32,
                       description='32 px, 20k train.'),
      MmclShapesConfig(name='tiny', num_train=512, num_validation=128,
                       num_test=128, description='64 px, small; for tests.'),
  ]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # No checksums file to locate. Also, TFDS's own lookup needs the optional
    # `importlib_resources` package for builders outside TFDS.
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    label = tfds.features.ClassLabel
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(size, size, 3),
                                         encoding_format='png'),
            'captions': tfds.features.Sequence(tfds.features.Text()),
            'shape': label(names=generator.SHAPES),
            'color': label(names=generator.COLORS),
            'combo': label(names=generator.COMBO_NAMES),
            'size': label(names=generator.SIZES),
            'num_objects': tfds.features.Scalar(dtype=np.int32),
            'objects': tfds.features.Sequence({
                'bbox': tfds.features.BBoxFeature(),
                'caption': tfds.features.Text(),
            }),
        }),
        supervised_keys=None,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    cfg = self.builder_config
    return {
        'train': self._generate_examples('train', cfg.num_train),
        'validation': self._generate_examples('validation', cfg.num_validation),
        'test': self._generate_examples('test', cfg.num_test),
    }

  def _generate_examples(self, split: str, num_examples: int):
    cfg = self.builder_config
    for index in range(num_examples):
      rng = generator.example_rng(cfg.seed, split, index)
      example = generator.make_example(rng, cfg.image_size, split)
      # Of the layout, only each object's box and region caption are stored.
      objects = example.pop('objects')
      example['objects'] = {
          'bbox': np.stack([o['box'] for o in objects]).astype(np.float32),
          'caption': [o['region_caption'] for o in objects]}
      example['image'] = encode_png(example['image'])
      yield index, example


@contextlib.contextmanager
def _quiet():
  """Silences TFDS logs, prints and progress bars, then restores them."""
  verbosity = logging.get_verbosity()
  # TFDS has no public getter for the progress-bar switch.
  bars = getattr(tfds.core.utils.tqdm_utils, '_active', True)
  logging.set_verbosity(logging.ERROR)
  tfds.display_progress_bar(False)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    tfds.display_progress_bar(bars)
    logging.set_verbosity(verbosity)


def prepare(data_dir: str, config: str = 'default') -> tfds.core.DatasetBuilder:
  """Builds `mmcl_shapes/<config>` into `data_dir` unless already built.

  Args:
    data_dir: TFDS data directory (created if missing).
    config: one of 'default', 'px32', 'tiny'.

  Returns:
    The prepared builder, e.g. for `builder.as_dataset(split='train')`.
  """
  with _quiet():
    builder = MmclShapes(config=config, data_dir=data_dir)
    if not builder.is_prepared():
      builder.download_and_prepare(
        download_dir=os.path.join(data_dir, 'downloads'),
        download_config=tfds.download.DownloadConfig(
            try_download_gcs=False,
            compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder
