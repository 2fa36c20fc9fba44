"""Input pipelines. Importing the package registers every pp op (preprocess.py's registry)."""
from mmcl.data import pp_image, pp_keys, pp_naflex, pp_text  # noqa: F401  (register their ops)
