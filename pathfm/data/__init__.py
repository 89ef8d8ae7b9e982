"""Data: whole-slide reading, tissue masks, online tile sampling, augmentation, masking."""
