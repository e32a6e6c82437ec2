"""fairchem's released eSEN models in and out: read their checkpoints without unpickling
anything but an allow-list (files.py), map their settings and weights one to one onto this
model (source.py, weights.py, importer.py), and write this model back as a fairchem-core 2.x
checkpoint (exporter.py). The commands `esen-train import-fairchem` / `export-fairchem` are in esen_train/cli/train/."""
