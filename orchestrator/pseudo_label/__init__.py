"""Pseudo-labelling (`kind: pseudo_label`): image-text pairs -> grounded boxes, one file per stage.

    captions ─ noun_phrases ─▶ detect (detector actor pool, the phrases as vocabulary) ─▶ rescore (CLIP or the
    detector's own region-text score) ─▶ filters (c~ = sqrt(c s_r), per-phrase NMS, thresholds) ─▶ job (shards
    of labels, resumable; CC3M-format JSON; ingest) ─▶ report (statistics, plots) [+ quality vs known truth]
"""
