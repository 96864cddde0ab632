"""Tools around a model: fine-tuning (freeze / unfreeze), predict to CSV, export, inspection; and the streaming
dataset's writer (optimize_data.py) and reader."""
