"""capfilt components: one module per pipeline stage plus the shared pieces they use
(configuration, storage, schemas, expectations, data loading, training, checkpoints)."""
