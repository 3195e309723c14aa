"""Images in: the dataset sources (--data_dir), decoding, the image cache, transforms and the DataModule."""
