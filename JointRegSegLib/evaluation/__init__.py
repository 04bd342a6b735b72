"""`jointregseg evaluate`: accuracy, smoothness, time and memory of registration methods on labelled pairs."""
