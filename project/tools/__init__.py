"""Tools around a model: fine-tuning (freeze / unfreeze), predict to CSV, export, inspection."""
