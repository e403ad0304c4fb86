//! The trained softmax model as an ONNX file, so that the `inference` operator can serve
//! what the fleet trained.
//!
//! The graph: `x` float32 [N, features] → MatMul W → Add b → `probabilities` = Softmax
//! (float32 [N, classes]) and `label` = ArgMax over the classes (int64 [N, 1]); opset 17, IR
//! version 8. The protobuf (onnx.proto's ModelProto) is written here directly: a few message
//! types, each field tagged by its number in onnx.proto.

use super::learn::Softmax;

/// Protobuf wire-format writer.
#[derive(Default)]
struct Message(Vec<u8>);

impl Message {
    fn varint(&mut self, mut value: u64) {
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                self.0.push(byte);
                return;
            }
            self.0.push(byte | 0x80);
        }
    }

    /// A varint field (wire type 0).
    fn int(&mut self, field: u64, value: i64) -> &mut Self {
        self.varint(field << 3);
        self.varint(value as u64);
        self
    }

    /// A length-delimited field (wire type 2).
    fn bytes(&mut self, field: u64, value: &[u8]) -> &mut Self {
        self.varint((field << 3) | 2);
        self.varint(value.len() as u64);
        self.0.extend_from_slice(value);
        self
    }

    fn string(&mut self, field: u64, value: &str) -> &mut Self {
        self.bytes(field, value.as_bytes())
    }

    fn message(&mut self, field: u64, value: &Message) -> &mut Self {
        self.bytes(field, &value.0)
    }
}

/// onnx.proto TensorProto.DataType values.
const FLOAT: i64 = 1;
const INT64: i64 = 7;

/// A float32 initializer: TensorProto { dims = 1, data_type = 2, name = 8, raw_data = 9 }.
fn initializer(name: &str, dims: &[usize], values: &[f32]) -> Message {
    let mut tensor = Message::default();
    for dim in dims {
        tensor.int(1, *dim as i64);
    }
    tensor.int(2, FLOAT).string(8, name);
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    tensor.bytes(9, &raw);
    tensor
}

/// ValueInfoProto { name = 1, type = 2: TypeProto { tensor_type = 1: { elem_type = 1,
/// shape = 2: { dim = 1: { dim_value = 1 | dim_param = 2 } } } } }; `None` is the batch
/// dimension `N`.
fn value_info(name: &str, element: i64, dims: &[Option<usize>]) -> Message {
    let mut shape = Message::default();
    for dim in dims {
        let mut d = Message::default();
        match dim {
            Some(size) => d.int(1, *size as i64),
            None => d.string(2, "N"),
        };
        shape.message(1, &d);
    }
    let mut tensor_type = Message::default();
    tensor_type.int(1, element).message(2, &shape);
    let mut type_proto = Message::default();
    type_proto.message(1, &tensor_type);
    let mut info = Message::default();
    info.string(1, name).message(2, &type_proto);
    info
}

/// NodeProto { input = 1, output = 2, name = 3, op_type = 4, attribute = 5 } with integer
/// attributes (AttributeProto { name = 1, i = 3, type = 20: INT = 2 }).
fn node(op: &str, inputs: &[&str], output: &str, attributes: &[(&str, i64)]) -> Message {
    let mut node = Message::default();
    for input in inputs {
        node.string(1, input);
    }
    node.string(2, output).string(3, output).string(4, op);
    for (name, value) in attributes {
        let mut attribute = Message::default();
        attribute.string(1, name).int(3, *value).int(20, 2);
        node.message(5, &attribute);
    }
    node
}

/// The ONNX bytes of `model` with `weights` (features x classes, then the biases), as model
/// version `version`.
pub fn softmax_onnx(model: &Softmax, weights: &[f32], version: u64, description: &str) -> Vec<u8> {
    let (features, classes) = (model.features, model.classes);
    let (w, b) = weights.split_at(features * classes);
    let mut graph = Message::default();
    graph
        .message(1, &node("MatMul", &["x", "W"], "logits_w", &[]))
        .message(1, &node("Add", &["logits_w", "b"], "logits", &[]))
        .message(1, &node("Softmax", &["logits"], "probabilities", &[("axis", 1)]))
        .message(1, &node("ArgMax", &["logits"], "label", &[("axis", 1), ("keepdims", 1)]))
        .string(2, "edgeflow_federated_softmax")
        .message(5, &initializer("W", &[features, classes], w))
        .message(5, &initializer("b", &[classes], b))
        .message(11, &value_info("x", FLOAT, &[None, Some(features)]))
        .message(12, &value_info("probabilities", FLOAT, &[None, Some(classes)]))
        .message(12, &value_info("label", INT64, &[None, Some(1)]));
    let mut opset = Message::default();
    opset.string(1, "").int(2, 17);
    let mut model_proto = Message::default();
    model_proto
        .int(1, 8)
        .string(2, "edgeflow")
        .string(3, env!("CARGO_PKG_VERSION"))
        .int(5, version as i64)
        .string(6, description)
        .message(7, &graph)
        .message(8, &opset);
    model_proto.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_follow_the_wire_format() {
        let mut m = Message::default();
        m.varint(300);
        assert_eq!(m.0, vec![0xac, 0x02]);
        let mut m = Message::default();
        m.int(1, 8);
        assert_eq!(m.0, vec![0x08, 0x08]);
        let mut m = Message::default();
        m.string(2, "ab");
        assert_eq!(m.0, vec![0x12, 0x02, b'a', b'b']);
    }
}
