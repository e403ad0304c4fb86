//! The dataflow of a pipeline as a Mermaid or Graphviz DOT diagram.

use std::fmt::Write;

use crate::config::{Pipeline, PortRef};

/// Diagram formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Mermaid flowchart (renders on GitHub).
    Mermaid,
    /// Graphviz DOT.
    Dot,
}

fn edges(pipeline: &Pipeline) -> Vec<(String, String, String)> {
    let mut edges = Vec::new();
    let label = |reference: &PortRef| reference.port.clone().unwrap_or_default();
    for operator in &pipeline.operators {
        for input in &operator.inputs {
            edges.push((input.component.clone(), operator.name.clone(), label(input)));
        }
    }
    for sink in &pipeline.sinks {
        if sink.inputs.is_empty() {
            for source in &pipeline.sources {
                edges.push((source.name.clone(), sink.name.clone(), "dead_letters".into()));
            }
        }
        for input in &sink.inputs {
            edges.push((input.component.clone(), sink.name.clone(), label(input)));
        }
    }
    edges
}

/// Renders `pipeline` in `format`.
pub fn render(pipeline: &Pipeline, format: Format) -> String {
    let mut out = String::new();
    let nodes: Vec<(String, String, &str)> = pipeline
        .sources
        .iter()
        .map(|s| (s.name.clone(), s.kind.name().to_owned(), "source"))
        .chain(pipeline.operators.iter().map(|o| {
            let ports: Vec<&str> = o.ports.outputs.iter().map(|(p, _)| *p).collect();
            (o.name.clone(), format!("{} → {}", o.kind.name(), ports.join(", ")), "operator")
        }))
        .chain(pipeline.sinks.iter().map(|s| (s.name.clone(), s.kind.name().to_owned(), "sink")))
        .collect();
    match format {
        Format::Mermaid => {
            let _ = writeln!(out, "flowchart LR");
            for (name, kind, role) in &nodes {
                let (open, close) = match *role {
                    "source" => ("[(", ")]"),
                    "sink" => ("[/", "/]"),
                    _ => ("[", "]"),
                };
                let _ = writeln!(out, "    {name}{open}\"{name}<br/><small>{kind}</small>\"{close}");
            }
            for (from, to, port) in edges(pipeline) {
                if port.is_empty() {
                    let _ = writeln!(out, "    {from} --> {to}");
                } else {
                    let _ = writeln!(out, "    {from} -- {port} --> {to}");
                }
            }
        }
        Format::Dot => {
            let _ = writeln!(out, "digraph \"{}\" {{\n    rankdir=LR;", pipeline.name);
            for (name, kind, role) in &nodes {
                let shape = match *role {
                    "source" => "cylinder",
                    "sink" => "parallelogram",
                    _ => "box",
                };
                let _ = writeln!(out, "    \"{name}\" [shape={shape}, label=\"{name}\\n{kind}\"];");
            }
            for (from, to, port) in edges(pipeline) {
                let _ = writeln!(out, "    \"{from}\" -> \"{to}\" [label=\"{port}\"];");
            }
            let _ = writeln!(out, "}}");
        }
    }
    out
}
