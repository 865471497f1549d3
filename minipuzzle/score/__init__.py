"""Importance scoring: a score for every layer and every prunable unit of a Nemotron-H checkpoint.

One module per job: `depth` (drop-one-layer scores), `width` (each axis's activation hooks), `experts` (routed
experts' estimators), `layerwise` (a model or a streamed checkpoint as a stack of blocks), `scoring` (both passes
over a model, a stack or a checkpoint), `scores` (the `Scores` tables and their folder), `folder` (the `score`
stage: windows, scoring, the folder), `plots`, `command` (`minipuzzle score`). Import from the module that does
the job: this package imports none of them, so the memory plan can import `depth`'s constants without the stage."""
