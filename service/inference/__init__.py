"""The one place that turns admitted frames into answers: admission (and every refusal of work), the dynamic batcher,
the model slot a request binds to, and the pipeline. May import records, signals, backends, settings and core."""
