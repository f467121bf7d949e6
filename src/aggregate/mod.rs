//! Aggregators: combine client updates into the new global adapter
//! (security-weighted FedAvg with the safety gate, and classic robust rules).
