"""JAX against torchvision (and, for R50-FPN inference, Detectron2), each on the same weights,
images and machine: `mrcnn-jax benchmark`.

  inputs   settings of a run, the photos (or synthetic ones), train batches, letterboxed
           throughput samples, the seeded inputs of the micro-benchmarks
  context  what the cases share, built lazily: photos, torchvision's reference model, its
           state_dict, our Predictors, Detectron2's calibrated model as a zoo .pkl and its
           DefaultPredictor (or, in a memory probe, the files the parent saved)
  cases    the case names and one builder per (case, side): a blocking fn() and a summary
  harness  interleaved timing (A B A B, or rounds of four sides with Detectron2), per-pair
           ratios, XLA compile events, `run_case`
  memory   peak-memory probes in subprocesses (peak RSS, device peaks)
  report   machine info, header, markdown table, JSON rows
  cli      arguments, case selection, `main(argv)` (the cases and output are described there)

torch and torchvision are imported only inside the functions that need them: importing this
package (or `mrcnn_jax.bench.cli`) does not import them; they come with `mrcnn-jax[bench]`.
Detectron2 (vendored source, `../shared/vendor/detectron2` or $MRCNN_JAX_DETECTRON2) is imported
only by its side of the benchmark; without it that column is skipped with its reason.
"""
