"""Names of the Kaggle ImageNet layout, and the data error type, shared by the data sources, the
demo generator and the download command (no TensorFlow import)."""

import os

SYNSET_MAPPING = "LOC_synset_mapping.txt"
VAL_SOLUTION = "LOC_val_solution.csv"
KAGGLE_IMAGE_ROOT = os.path.join("ILSVRC", "Data", "CLS-LOC")
EXTRACTING_MARKER = ".keras_resnet_extracting"   # keras_resnet.download: extraction unfinished


class DataError(Exception):
    """A data problem the user can fix; the message says how (one line)."""
