"""Pure steps and data of an inspection: bundle, decode and letterbox, tiling plan, post-processing, merge, results,
the error vocabulary and the offline inspector that `aoi val` / `aoi predict` use. No threads, no HTTP, no global
state. Imports nothing else of `service`."""
