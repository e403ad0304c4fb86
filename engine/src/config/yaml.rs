//! A YAML document as a tree of nodes that remember where they were written, so that every
//! problem can be reported with its line and column.

use std::collections::HashMap;
use std::fmt;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A position in the YAML text, both 1-based.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mark {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub col: usize,
}

impl fmt::Display for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

impl From<Marker> for Mark {
    fn from(marker: Marker) -> Self {
        Mark { line: marker.line(), col: marker.col() + 1 }
    }
}

/// One YAML value with its position.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// The value.
    pub value: Value,
    /// Where it starts.
    pub mark: Mark,
}

/// A YAML value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// A scalar and whether it was written plain (unquoted), which decides whether `30`
    /// is a number or a string.
    Scalar { text: String, plain: bool },
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, in written order, duplicates kept so that they can be reported.
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// The scalar text, if this is a scalar.
    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// The entries, if this is a mapping.
    pub fn as_map(&self) -> Option<&[(Node, Node)]> {
        match &self.value {
            Value::Map(entries) => Some(entries),
            _ => None,
        }
    }

    /// The value under `key` in a mapping (the first, if duplicated).
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.as_map()?.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v)
    }

    /// What kind of value this is, for messages.
    pub fn kind(&self) -> &'static str {
        match &self.value {
            Value::Scalar { .. } => "a scalar",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    /// The node at a serde path such as `regions[0].name` below this node, or the deepest
    /// node that exists on the way.
    pub fn locate(&self, path: &str) -> &Node {
        let mut node = self;
        for segment in path.split('.').filter(|s| !s.is_empty()) {
            let (field, indices) = match segment.find('[') {
                Some(at) => (&segment[..at], &segment[at..]),
                None => (segment, ""),
            };
            if !field.is_empty() {
                match node.as_map().and_then(|entries| entries.iter().find(|(k, _)| k.as_str() == Some(field))) {
                    Some((_, value)) => node = value,
                    None => return node,
                }
            }
            for index in indices.split(['[', ']']).filter(|s| !s.is_empty()) {
                match (&node.value, index.parse::<usize>()) {
                    (Value::Seq(items), Ok(i)) if i < items.len() => node = &items[i],
                    _ => return node,
                }
            }
        }
        node
    }

    /// The key node of `field` in this mapping, for problems about the key itself.
    pub fn key_of(&self, field: &str) -> Option<&Node> {
        self.as_map()?.iter().find(|(k, _)| k.as_str() == Some(field)).map(|(k, _)| k)
    }

    /// Converts to JSON, inferring plain scalars' types as YAML 1.2's core schema does.
    pub fn to_json(&self) -> serde_json::Value {
        match &self.value {
            Value::Scalar { text, plain: false } => serde_json::Value::String(text.clone()),
            Value::Scalar { text, plain: true } => plain_scalar(text),
            Value::Seq(items) => serde_json::Value::Array(items.iter().map(Node::to_json).collect()),
            Value::Map(entries) => serde_json::Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.as_str().map_or_else(|| format!("{:?}", k.value), str::to_owned), v.to_json()))
                    .collect(),
            ),
        }
    }
}

fn plain_scalar(text: &str) -> serde_json::Value {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return serde_json::Value::Null,
        "true" | "True" | "TRUE" => return serde_json::Value::Bool(true),
        "false" | "False" | "FALSE" => return serde_json::Value::Bool(false),
        _ => {}
    }
    if let Ok(int) = text.parse::<i64>() {
        return int.into();
    }
    if let Ok(int) = text.parse::<u64>() {
        return int.into();
    }
    let looks_numeric = text.chars().next().is_some_and(|c| c.is_ascii_digit() || c == '-' || c == '+' || c == '.');
    if looks_numeric {
        if let Some(number) = text.parse::<f64>().ok().and_then(serde_json::Number::from_f64) {
            return serde_json::Value::Number(number);
        }
    }
    serde_json::Value::String(text.to_owned())
}

/// A YAML syntax error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    /// What the parser expected.
    pub message: String,
    /// Where.
    pub mark: Mark,
}

/// Most nodes a document may have once its aliases are expanded. Aliases copy the anchored
/// node, so a few hundred bytes of nested aliases ("billion laughs") could otherwise expand
/// to billions of nodes; a pipeline has a few hundred.
pub const MAX_NODES: usize = 100_000;

/// Parses one YAML document. An empty document is an empty mapping. A document with more
/// than [`MAX_NODES`] nodes, counting every alias as the nodes it copies, is refused.
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    parser
        .load(&mut builder, false)
        .map_err(|err| SyntaxError { message: err.info().to_owned(), mark: Mark::from(*err.marker()) })?;
    if let Some(mark) = builder.too_large {
        return Err(SyntaxError {
            message: format!(
                "the document expands to more than {MAX_NODES} nodes (aliases count as the nodes they copy); \
                 a pipeline needs far fewer: check for aliases that refer to aliases"
            ),
            mark,
        });
    }
    Ok(builder.root.unwrap_or(Node { value: Value::Map(Vec::new()), mark: Mark { line: 1, col: 1 } }))
}

#[derive(Default)]
struct Builder {
    stack: Vec<(Node, usize)>,
    /// Pending key of each open mapping.
    keys: Vec<Option<Node>>,
    /// Anchored nodes with their sizes in nodes.
    anchors: HashMap<usize, (Node, usize)>,
    root: Option<Node>,
    /// Nodes so far, aliases expanded.
    nodes: usize,
    /// Where the document passed [`MAX_NODES`], if it did: nothing more is built.
    too_large: Option<Mark>,
}

fn size(node: &Node) -> usize {
    match &node.value {
        Value::Scalar { .. } => 1,
        Value::Seq(items) => 1 + items.iter().map(size).sum::<usize>(),
        Value::Map(entries) => 1 + entries.iter().map(|(k, v)| size(k) + size(v)).sum::<usize>(),
    }
}

impl Builder {
    /// Counts `added` nodes; false once the document is too large.
    fn count(&mut self, added: usize, mark: Mark) -> bool {
        self.nodes = self.nodes.saturating_add(added);
        if self.nodes > MAX_NODES && self.too_large.is_none() {
            self.too_large = Some(mark);
        }
        self.too_large.is_none()
    }

    fn push_value(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            let nodes = size(&node);
            self.anchors.insert(anchor, (node.clone(), nodes));
        }
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some((parent, _)) => match &mut parent.value {
                Value::Seq(items) => items.push(node),
                Value::Map(entries) => {
                    let slot = self.keys.last_mut().unwrap_or_else(|| unreachable!("a mapping has a key slot"));
                    match slot.take() {
                        None => *slot = Some(node),
                        Some(key) => entries.push((key, node)),
                    }
                }
                Value::Scalar { .. } => unreachable!("scalars are never pushed on the stack"),
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, event: Event, marker: Marker) {
        let mark = Mark::from(marker);
        let added = match &event {
            Event::Scalar(..) | Event::SequenceStart(..) | Event::MappingStart(..) => 1,
            Event::Alias(anchor) => self.anchors.get(anchor).map_or(1, |(_, nodes)| *nodes),
            _ => 0,
        };
        if !self.count(added, mark) {
            return;
        }
        match event {
            Event::Scalar(text, style, anchor, _tag) => {
                let plain = style == TScalarStyle::Plain;
                self.push_value(Node { value: Value::Scalar { text, plain }, mark }, anchor);
            }
            Event::SequenceStart(anchor, _) => {
                self.stack.push((Node { value: Value::Seq(Vec::new()), mark }, anchor));
            }
            Event::MappingStart(anchor, _) => {
                self.stack.push((Node { value: Value::Map(Vec::new()), mark }, anchor));
                self.keys.push(None);
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((node, anchor)) = self.stack.pop() {
                    if matches!(node.value, Value::Map(_)) {
                        self.keys.pop();
                    }
                    self.push_value(node, anchor);
                }
            }
            Event::Alias(anchor) => {
                let node = self
                    .anchors
                    .get(&anchor)
                    .map(|(node, _)| node.clone())
                    .unwrap_or(Node { value: Value::Scalar { text: String::new(), plain: true }, mark });
                self.push_value(node, 0);
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentStart | Event::DocumentEnd => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_positions_and_duplicates() {
        let doc = parse("a: 1\nb:\n  c: [x, \"2\"]\na: 3\n").unwrap();
        let entries = doc.as_map().unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[1].1.get("c").unwrap().mark, Mark { line: 3, col: 6 });
        assert_eq!(doc.locate("b.c[1]").mark, Mark { line: 3, col: 10 });
        assert_eq!(doc.to_json()["b"]["c"][1], serde_json::json!("2"));
        assert_eq!(doc.to_json()["a"], serde_json::json!(3));
    }

    #[test]
    fn an_alias_bomb_is_refused_before_it_expands() {
        // "Billion laughs": 9 levels of 9 aliases each, 614 bytes that expand to 9^9 nodes.
        let mut text =
            String::from("a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n");
        for (level, name) in "bcdefghi".chars().enumerate() {
            let previous = (b'a' + level as u8) as char;
            let refs = vec![format!("*{previous}"); 9].join(",");
            text.push_str(&format!("{name}: &{name} [{refs}]\n"));
        }
        assert!(text.len() < 700, "{}", text.len());
        let err = parse(&text).unwrap_err();
        assert!(err.message.contains("expands to more than 100000 nodes"), "{err:?}");
        assert!(err.mark.line >= 5, "{err:?}");
        // Ordinary aliases still work.
        let doc = parse("base: &b {x: 1}\nother: *b\n").unwrap();
        assert_eq!(doc.to_json()["other"]["x"], serde_json::json!(1));
    }

    #[test]
    fn syntax_errors_have_positions() {
        let err = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.mark.line >= 1, "{err:?}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 1000, ..Default::default() })]

        /// Any text, YAML-ish or not: a node tree or a syntax error with its position, and a
        /// pipeline or its problems, never a panic.
        #[test]
        fn any_text_parses_or_says_where(text in "([a-z:&*!|>\\[\\]{},#\"'\\- ]|\n|  ){0,120}") {
            if let Ok(node) = parse(&text) {
                let _ = node.to_json();
            }
            let _ = crate::config::load_str(&text, "fuzz.yaml", &|_| None);
        }
    }
}
