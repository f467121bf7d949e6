//! `--scenario` values: every form parses, prints back as itself and
//! round-trips through serde; bad parameters fail with a message naming
//! what is wrong; the names from before scenarios took parameters still work.

#[path = "../examples/fed_llama/scenario.rs"]
#[allow(dead_code)]
mod scenario;

use scenario::{Knowledge, Scenario};

#[test]
fn every_zoo_scenario_round_trips_through_text_and_serde() {
    for s in Scenario::zoo() {
        let text = s.to_string();
        assert_eq!(text.parse::<Scenario>(), Ok(s), "{text}");
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, format!("\"{text}\""));
        assert_eq!(serde_json::from_str::<Scenario>(&json).unwrap(), s);
    }
    assert_eq!(Scenario::zoo().len(), 17);
}

#[test]
fn parameters_parse_to_their_values() {
    let cases = [
        ("mixed:0.3", Scenario::Mixed(300)),
        ("mixed:1", Scenario::Mixed(1000)),
        ("mixed:0.125", Scenario::Mixed(125)),
        ("scaling:5", Scenario::Scaling(Some(5))),
        ("scaling", Scenario::Scaling(None)),
        ("adaptive", Scenario::Adaptive(Knowledge::Stale)),
        ("adaptive:white", Scenario::Adaptive(Knowledge::White)),
        (
            "adaptive:surrogate",
            Scenario::Adaptive(Knowledge::Surrogate),
        ),
        (
            "adaptive:just-under",
            Scenario::Adaptive(Knowledge::JustUnder),
        ),
        ("sleeper:4", Scenario::Sleeper(4)),
        ("alternate", Scenario::Alternate),
        ("sybil:3", Scenario::Sybil(3)),
        ("lie-both", Scenario::LieBoth),
        // The names before parameters.
        ("mixed10", Scenario::Mixed(100)),
        ("mixed30", Scenario::Mixed(300)),
        ("lie-trail", Scenario::LieTrail),
        ("lie-shadow", Scenario::LieShadow),
        ("sign-flip", Scenario::SignFlip),
        ("noise", Scenario::Noise),
        ("alie", Scenario::Alie),
        ("ipm", Scenario::Ipm),
        ("poison", Scenario::Poison),
    ];
    for (text, want) in cases {
        assert_eq!(text.parse::<Scenario>(), Ok(want), "{text}");
    }
    assert_eq!(Scenario::Mixed(300).harmful_share(), 0.3);
    assert_eq!(Scenario::Mixed(100).to_string(), "mixed:0.1");
}

#[test]
fn bad_parameters_say_what_is_wrong() {
    let err = |text: &str| text.parse::<Scenario>().unwrap_err();
    for (text, says) in [
        ("mixed", "needs a harmful share"),
        ("mixed:0", "(0, 1]"),
        ("mixed:1.5", "(0, 1]"),
        ("mixed:abc", "must be a number"),
        ("mixed:0.0001", "(0, 1]"),
        ("mixed:0.1234", "to a thousandth"),
        ("scaling:0", "whole number ≥ 1"),
        ("scaling:2.5", "whole number ≥ 1"),
        ("sleeper", "needs the honest rounds"),
        ("sleeper:-1", "whole number"),
        ("sybil", "needs the colluders"),
        ("sybil:0", "whole number ≥ 1"),
        ("adaptive:black", "expected white, surrogate or just-under"),
        ("poison:3", "takes no parameter"),
        ("alternate:2", "takes no parameter"),
        ("sybli:3", "did you mean \"sybil\""),
        ("zzz", "expected one of"),
    ] {
        let e = err(text);
        assert!(e.contains(says), "{text}: {e}");
    }
    assert!(serde_json::from_str::<Scenario>("\"mixed:2\"").is_err());
}

#[test]
fn sleeper_and_alternate_attack_in_the_stated_rounds() {
    let rounds = |s: Scenario| (0..6).filter(|&r| s.attacks_in(r)).collect::<Vec<_>>();
    assert_eq!(rounds(Scenario::Sleeper(4)), [4, 5]);
    assert_eq!(rounds(Scenario::Alternate), [1, 3, 5]);
    assert_eq!(rounds(Scenario::Poison), [0, 1, 2, 3, 4, 5]);
    assert!(Scenario::LieBoth.lies_in_trail() && Scenario::LieBoth.lies_in_shadow());
    assert!(!Scenario::LieTrail.lies_in_shadow() && !Scenario::LieShadow.lies_in_trail());
    assert!(Scenario::Sybil(3).crafts_update() && !Scenario::Sleeper(2).crafts_update());
}
