"""capfilt models: pure PyTorch (ViT image encoder, the MED text transformer, BLIP heads,
losses and generation). No I/O, no tracking, no orchestration imports."""
