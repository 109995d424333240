"""Ray coordination: the coordinator, the worker actor that hosts one rank, GPU warm-up."""
