//! Detectors: turn one client's probe evidence for a round into a security
//! factor in [0, 1] (step-, client-, shadow- and evidence-level).
