//! Reference comparison for `window_aggregate`: random keyed records, tumbling and sliding
//! windows; the operator's results equal a from-scratch computation per window, on 1 and 3
//! workers.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use edgeflow_operators::window_aggregate::{Aggregate, WindowAggregate, WindowParams};
use edgeflow_operators::{DurationMs, WindowResult};
use proptest::prelude::*;
use timely::dataflow::operators::Inspect;
use timely::dataflow::InputHandle;

const ALL: [Aggregate; 5] = [Aggregate::Count, Aggregate::Sum, Aggregate::Mean, Aggregate::Min, Aggregate::Max];

fn run(records: &[(u8, u64, i32)], size: u64, slide: u64, workers: usize) -> Vec<WindowResult> {
    let results = Arc::new(Mutex::new(Vec::new()));
    let sink = results.clone();
    let records = records.to_vec();
    timely::execute(timely::Config::process(workers), move |worker| {
        let sink = sink.clone();
        let params = WindowParams::try_new(DurationMs(size), Some(DurationMs(slide)), &ALL, None).unwrap();
        let mut input = InputHandle::new();
        worker.dataflow::<u64, _, _>(|scope| {
            input
                .to_stream(scope)
                .window_aggregate("Windows", params, |r: &(u8, i32)| format!("k{}", r.0), |r, t| (*t, f64::from(r.1)))
                .inspect(move |result| sink.lock().unwrap().push(result.clone()));
        });
        if worker.index() == 0 {
            let mut sorted = records.clone();
            sorted.sort_by_key(|r| r.1);
            for (key, time, value) in sorted {
                input.advance_to(time);
                input.send(((key, value), time, 1isize));
                worker.step();
            }
        }
    })
    .unwrap();
    let mut results = Arc::try_unwrap(results).unwrap().into_inner().unwrap();
    results.sort();
    results
}

fn reference(records: &[(u8, u64, i32)], size: u64, slide: u64) -> Vec<WindowResult> {
    let mut windows: BTreeMap<(String, u64), Vec<f64>> = BTreeMap::new();
    for (key, time, value) in records {
        let mut start = time - time % slide;
        loop {
            if start + size > *time {
                windows.entry((format!("k{key}"), start + size)).or_default().push(f64::from(*value));
            }
            if start < slide {
                break;
            }
            start -= slide;
            if start + size <= *time {
                break;
            }
        }
    }
    let mut results: Vec<WindowResult> = windows
        .into_iter()
        .map(|((key, end), values)| {
            let sum: f64 = values.iter().sum();
            WindowResult {
                key,
                window_start: end - size,
                window_end: end,
                count: values.len() as u64,
                sum: Some(edgeflow_operators::records::Gauge(sum)),
                mean: Some(edgeflow_operators::records::Gauge(sum / values.len() as f64)),
                min: Some(edgeflow_operators::records::Gauge(values.iter().copied().fold(f64::INFINITY, f64::min))),
                max: Some(edgeflow_operators::records::Gauge(values.iter().copied().fold(f64::NEG_INFINITY, f64::max))),
                revision: 0,
            }
        })
        .collect();
    results.sort();
    results
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn windows_match_recomputation(
        records in prop::collection::vec((0u8..3, 0u64..300, -50i32..50), 1..60),
        (size, slide) in prop_oneof![Just((10u64, 10u64)), Just((20, 5)), Just((30, 10)), Just((7, 7))],
    ) {
        let expected = reference(&records, size, slide);
        prop_assert_eq!(run(&records, size, slide, 1), expected.clone());
        prop_assert_eq!(run(&records, size, slide, 3), expected);
    }
}
