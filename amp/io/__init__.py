"""The outside world: model folders, GGUF files and the bundled default (models.py); safetensors checkpoints read
lazily and output shards written as layers finish (safetensors_io.py); layer sources and sinks (sources.py,
sinks.py); finished folders loaded back (loading.py); atomic output folders and reports (folders.py); calibration
data and token batches (calibration.py); where calibration activations live (activations.py); the Pythons of the
outside runtimes (runtimes.py); `amp info`."""
