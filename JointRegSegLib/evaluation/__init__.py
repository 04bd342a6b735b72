"""The one evaluator: scoring (the scoring core), validation (a network on its working grid: training's card
metrics), evaluate and methods (methods over labelled file pairs: `jointregseg evaluate` and the benchmarks)."""
