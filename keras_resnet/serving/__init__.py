"""Serving: SavedModel export with an image-bytes signature (export) and prediction from any
exported or saved model (predict)."""
