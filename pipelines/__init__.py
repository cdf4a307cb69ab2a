"""Input pipelines: data sources, preprocessing and tf.data datasets (no keras_resnet imports)."""
