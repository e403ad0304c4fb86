//! Property tests of every decoder of outside input and of the time arithmetic: whatever the
//! bytes or numbers, a decoder returns a value or a reason and never panics, and what it
//! accepts is within the documented bounds.

use edgeflow_operators::federated::secure_protocol::{ClientStep, SECAGG_FORMAT};
use edgeflow_operators::federated::update::{ModelUpdate, Payload};
use edgeflow_operators::node_health::{NodeHealthConfig, NodeHealthParams};
use edgeflow_operators::time::{FutureBound, MAX_EVENT_TIME};
use edgeflow_operators::window_aggregate::{Aggregate, WindowParams};
use edgeflow_operators::{DurationMs, Heartbeat, InferenceRequest, RecordKind, Tensor};
use proptest::prelude::*;

/// JSON-ish text: fragments of the records' own syntax, so that the decoders see nearly
/// valid input as well as noise.
fn jsonish() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("{".to_owned()),
        Just("}".to_owned()),
        Just("[".to_owned()),
        Just("]".to_owned()),
        Just(",".to_owned()),
        Just(":".to_owned()),
        Just("\"timestamp\"".to_owned()),
        Just("\"shape\"".to_owned()),
        Just("\"data\"".to_owned()),
        Just("\"inputs\"".to_owned()),
        Just("\"node_id\"".to_owned()),
        Just("\u{feff}".to_owned()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| f.to_string()),
        "[a-z\"\\\\]{0,6}",
    ];
    prop::collection::vec(token, 0..40).prop_map(|tokens| tokens.concat())
}

fn heartbeat(time: u64, cpu: f64) -> String {
    format!(r#"{{"node_id":"n","region":"r","lat":1,"lon":2,"timestamp":{time},"cpu":{cpu},"memory":1,"disk":1}}"#)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn decoders_never_panic_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        for kind in [RecordKind::Heartbeats, RecordKind::InferenceRequests, RecordKind::ModelUpdates] {
            let _ = kind.decode(&bytes);
        }
    }

    #[test]
    fn decoders_never_panic_on_jsonish_text(text in jsonish()) {
        for kind in [RecordKind::Heartbeats, RecordKind::InferenceRequests, RecordKind::ModelUpdates] {
            let _ = kind.decode(text.as_bytes());
        }
    }

    #[test]
    fn a_heartbeat_is_accepted_only_with_a_time_up_to_year_9999(time in any::<u64>(), cpu in -10.0f64..110.0) {
        match Heartbeat::from_json(heartbeat(time, cpu).as_bytes()) {
            Ok(beat) => prop_assert!(beat.timestamp <= MAX_EVENT_TIME && (0.0..=100.0).contains(&beat.cpu)),
            Err(reason) => prop_assert!(time > MAX_EVENT_TIME || !(0.0..=100.0).contains(&cpu), "{reason}"),
        }
    }

    #[test]
    fn tensor_shapes_are_checked_without_overflow(
        shape in prop::collection::vec(prop_oneof![0usize..8, any::<usize>(), Just(1usize << 62)], 0..20),
        values in 0usize..64,
    ) {
        let tensor = Tensor { shape: shape.clone(), data: vec![0.5; values] };
        if tensor.validate("x").is_ok() {
            let product = shape.iter().try_fold(1usize, |p, d| p.checked_mul(*d));
            prop_assert_eq!(product, Some(values));
            prop_assert!(shape.len() <= Tensor::MAX_DIMENSIONS);
            prop_assert!(shape.iter().all(|d| *d <= Tensor::MAX_VALUES));
        }
        let request = serde_json::json!({
            "id": "r", "model": "m", "timestamp": 1,
            "inputs": {"x": {"shape": shape, "data": vec![0.5; values]}},
        });
        let _ = InferenceRequest::from_json(request.to_string().as_bytes());
    }

    #[test]
    fn payloads_decode_or_say_why(parameters in any::<u64>(), data in prop::collection::vec(any::<u8>(), 0..64), text in "[A-Za-z0-9+/=]{0,40}") {
        use base64::Engine as _;
        for data in [base64::engine::general_purpose::STANDARD.encode(&data), text.clone()] {
            let payload = Payload { format: "f32le+zstd".into(), parameters, data };
            if let Ok(values) = payload.decode() {
                prop_assert_eq!(values.len() as u64, parameters);
            }
        }
    }

    #[test]
    fn secure_aggregation_steps_decode_or_say_why(data in "[A-Za-z0-9+/=]{0,80}", json in jsonish()) {
        use base64::Engine as _;
        for data in [data.clone(), base64::engine::general_purpose::STANDARD.encode(json.as_bytes())] {
            let update = ModelUpdate {
                round: 1,
                client_id: "c".into(),
                num_examples: 0,
                base_version: 0,
                timestamp: 0,
                payload: Payload { format: SECAGG_FORMAT.into(), parameters: 0, data },
                metrics: Default::default(),
            };
            prop_assert!(ClientStep::from_update(&update).is_some());
        }
    }

    #[test]
    fn durations_parse_or_say_why(text in "[0-9]{0,25}[a-z ]{0,4}") {
        if let Ok(duration) = text.parse::<DurationMs>() {
            // What prints parses back to the same duration.
            prop_assert_eq!(duration.to_string().parse::<DurationMs>(), Ok(duration));
        }
    }

    #[test]
    fn the_future_bound_never_overflows(max_ahead in any::<u64>(), now in any::<u64>(), time in any::<u64>()) {
        let bound = FutureBound::at(max_ahead, now);
        let verdict = bound.check(time);
        prop_assert_eq!(verdict.is_ok(), time <= now.saturating_add(max_ahead));
    }

    #[test]
    fn window_ends_saturate_and_hold_the_time(
        time in prop_oneof![any::<u64>(), Just(u64::MAX), 0u64..1000],
        window in 1u64..1_000_000,
        slides in 1u64..20,
    ) {
        let slide = (window / slides).max(1);
        let window = slide * slides.min(window);
        if let Ok(params) = WindowParams::try_new(DurationMs(window), Some(DurationMs(slide)), &[Aggregate::Count], None) {
            let ends: Vec<u64> = params.window_ends(time).collect();
            prop_assert!(!ends.is_empty() && ends.len() as u64 <= window / slide);
            prop_assert!(ends.windows(2).all(|w| w[0] <= w[1]));
            prop_assert!(ends.iter().all(|end| *end >= time.min(u64::MAX - window) ));
        }
    }

    #[test]
    fn rollup_window_ends_saturate(time in any::<u64>(), window in 1u64..u64::MAX) {
        let config = NodeHealthConfig {
            heartbeat_timeout: DurationMs(window.saturating_add(2)),
            unhealthy_after: DurationMs(window.saturating_add(1).min(window.saturating_add(2) - 1)),
            rollup_window: DurationMs(window),
            ..serde_json::from_str("{}").unwrap()
        };
        if let Ok(params) = NodeHealthParams::try_new(&config) {
            let end = params.window_end(time);
            prop_assert!(end >= time || end == u64::MAX - u64::MAX % window);
            let _ = params.status_at(time, &[(time, 1.0, 1.0, 1.0), (u64::MAX, 1.0, 1.0, 1.0)]);
        }
    }
}

#[test]
fn too_many_windows_per_record_are_refused() {
    let err =
        WindowParams::try_new(DurationMs(86_400_000), Some(DurationMs(1)), &[Aggregate::Count], None).unwrap_err();
    assert!(err.to_string().contains("puts every record in 86400000 windows; at most 1000"), "{err}");
}
