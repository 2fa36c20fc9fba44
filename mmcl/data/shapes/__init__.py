"""`mmcl_shapes`: built-in synthetic image-caption dataset (TFDS builder).

Importing this package registers the `mmcl_shapes` builder with TFDS, so
`tfds.builder('mmcl_shapes/tiny', data_dir=...)` works afterwards.
"""
from mmcl.data.shapes.builder import MmclShapes
from mmcl.data.shapes.builder import MmclShapesConfig
from mmcl.data.shapes.builder import prepare
from mmcl.data.shapes.generator import COLORS
from mmcl.data.shapes.generator import COMBO_NAMES
from mmcl.data.shapes.generator import HELDOUT_COMBOS
from mmcl.data.shapes.generator import make_example
from mmcl.data.shapes.generator import SHAPES
from mmcl.data.shapes.generator import SIZES

# Label names per classification task (index = TFDS ClassLabel value).
CLASS_NAMES = {'shape': SHAPES, 'color': COLORS, 'combo': COMBO_NAMES}

# Zero-shot prompt templates, worded like the training captions (and free of
# articles before colours, whose 'a'/'an' would differ between classes).
PROMPTS = {
    'shape': ['a {}', 'a picture of a {}', 'a small {}', 'a large {}'],
    'color': ['something {}', 'something {} in the middle',
              'something {} near the top', 'something {} near the bottom'],
    'combo': ['a small {}', 'a large {}', 'there is a small {}',
              'there is a large {}'],
}
