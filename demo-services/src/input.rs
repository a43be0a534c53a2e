//! Reading what a request sends: JSON bodies field by field and query strings, so a
//! refusal names the exact field (`items[1].quantity`) and the value that was wrong.

use std::ops::RangeInclusive;

use serde_json::{Map, Value};

/// One wrong piece of a request: where it is and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct InputError {
    pub field: String,
    pub problem: String,
}

impl InputError {
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// The request body as JSON.
pub fn json_body(body: &[u8]) -> Result<Value, InputError> {
    if body.is_empty() {
        return Err(InputError::new("body", "empty; a JSON object is expected"));
    }
    serde_json::from_slice(body).map_err(|e| InputError::new("body", format!("not JSON: {e}")))
}

/// A JSON object being read, with its path from the body's root for error messages.
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    map: &'a Map<String, Value>,
    path: &'a str,
}

/// The body's top-level object.
pub fn object(value: &Value) -> Result<Fields<'_>, InputError> {
    match value {
        Value::Object(map) => Ok(Fields { map, path: "" }),
        other => Err(InputError::new(
            "body",
            format!("expected a JSON object, got {}", describe(other)),
        )),
    }
}

impl<'a> Fields<'a> {
    /// Where field `name` of this object is, as the error messages say it.
    pub fn path_of(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        }
    }

    fn required(&self, name: &str) -> Result<&'a Value, InputError> {
        match self.map.get(name) {
            None | Some(Value::Null) => Err(InputError::new(self.path_of(name), "required")),
            Some(value) => Ok(value),
        }
    }

    /// Refuses fields this object does not have: a misspelt knob must not be ignored.
    pub fn only(&self, known: &[&str]) -> Result<(), InputError> {
        match self.map.keys().find(|key| !known.contains(&key.as_str())) {
            Some(unknown) => Err(InputError::new(
                self.path_of(unknown),
                format!("unknown field; expected one of {}", known.join(", ")),
            )),
            None => Ok(()),
        }
    }

    /// A required string with something in it other than spaces.
    pub fn string(&self, name: &str) -> Result<&'a str, InputError> {
        match self.required(name)? {
            Value::String(s) if !s.trim().is_empty() => Ok(s),
            Value::String(_) => Err(InputError::new(self.path_of(name), "must not be empty")),
            other => Err(InputError::new(
                self.path_of(name),
                format!("expected a string, got {}", describe(other)),
            )),
        }
    }

    /// A required whole number within `range`.
    pub fn whole(&self, name: &str, range: RangeInclusive<u64>) -> Result<u64, InputError> {
        let value = self.required(name)?;
        let out_of_range = || {
            InputError::new(
                self.path_of(name),
                format!(
                    "expected a whole number from {} to {}, got {}",
                    range.start(),
                    range.end(),
                    describe(value)
                ),
            )
        };
        match value.as_u64() {
            Some(n) if range.contains(&n) => Ok(n),
            _ => Err(out_of_range()),
        }
    }

    /// An optional number within `range`; `None` when the field is absent.
    pub fn optional_number(
        &self,
        name: &str,
        range: RangeInclusive<f64>,
    ) -> Result<Option<f64>, InputError> {
        let Some(value) = self.map.get(name) else {
            return Ok(None);
        };
        match value.as_f64() {
            Some(n) if range.contains(&n) => Ok(Some(n)),
            _ => Err(InputError::new(
                self.path_of(name),
                format!(
                    "expected a number from {} to {}, got {}",
                    range.start(),
                    range.end(),
                    describe(value)
                ),
            )),
        }
    }

    /// An optional whole number within `range`; `None` when the field is absent.
    pub fn optional_whole(
        &self,
        name: &str,
        range: RangeInclusive<u64>,
    ) -> Result<Option<u64>, InputError> {
        if !self.map.contains_key(name) {
            return Ok(None);
        }
        self.whole(name, range).map(Some)
    }

    /// A required, non-empty array of objects, each read by `read` with its own path
    /// (`items[2]`).
    pub fn objects<T>(
        &self,
        name: &str,
        mut read: impl FnMut(Fields<'_>) -> Result<T, InputError>,
    ) -> Result<Vec<T>, InputError> {
        let path = self.path_of(name);
        let elements = match self.required(name)? {
            Value::Array(elements) if !elements.is_empty() => elements,
            Value::Array(_) => return Err(InputError::new(path, "must not be empty")),
            other => {
                return Err(InputError::new(
                    path,
                    format!("expected an array, got {}", describe(other)),
                ));
            }
        };
        elements
            .iter()
            .enumerate()
            .map(|(i, element)| {
                let element_path = format!("{path}[{i}]");
                match element {
                    Value::Object(map) => read(Fields {
                        map,
                        path: &element_path,
                    }),
                    other => Err(InputError::new(
                        element_path.clone(),
                        format!("expected an object, got {}", describe(other)),
                    )),
                }
            })
            .collect()
    }
}

/// A value as an error message shows it: short, and with its JSON type visible.
fn describe(value: &Value) -> String {
    let text = value.to_string();
    if text.len() > 40 {
        let cut = (0..=40)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        format!("{}…", &text[..cut])
    } else {
        text
    }
}

/// The decoded value of query parameter `name` (the first if it repeats); `None` when
/// absent. `+` is a space and `%XX` an escaped byte, as browsers send them.
pub fn query_param(query: Option<&str>, name: &str) -> Result<Option<String>, InputError> {
    let Some(query) = query else {
        return Ok(None);
    };
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if decode(key).as_deref() == Some(name) {
            return decode(value)
                .map(Some)
                .ok_or_else(|| InputError::new(name, "not valid percent-encoded UTF-8"));
        }
    }
    Ok(None)
}

fn decode(text: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&first, tail)) = rest.split_first() {
        match first {
            b'+' => {
                bytes.push(b' ');
                rest = tail;
            }
            b'%' => {
                let hex = tail.get(..2)?;
                let hex = std::str::from_utf8(hex).ok()?;
                bytes.push(u8::from_str_radix(hex, 16).ok()?);
                rest = &tail[2..];
            }
            other => {
                bytes.push(other);
                rest = tail;
            }
        }
    }
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn nested_errors_name_the_path_and_the_value() {
        let body = json!({"user": "ann", "items": [{"productId": "p-01", "quantity": 1},
                                                   {"productId": "p-02", "quantity": "2"}]});
        let fields = object(&body).unwrap();
        let error = fields
            .objects("items", |item| item.whole("quantity", 1..=100))
            .unwrap_err();
        assert_eq!(error.field, "items[1].quantity");
        assert!(error.problem.contains("\"2\""), "{error}");
    }

    #[test]
    fn missing_empty_and_unknown_fields_are_refused() {
        let body = json!({"user": " ", "extra": 1});
        let fields = object(&body).unwrap();
        assert_eq!(
            fields.string("user").unwrap_err().problem,
            "must not be empty"
        );
        assert_eq!(fields.string("name").unwrap_err().problem, "required");
        assert_eq!(fields.only(&["user"]).unwrap_err().field, "extra");
        assert_eq!(object(&json!([1])).unwrap_err().field, "body");
        assert_eq!(json_body(b"{").unwrap_err().field, "body");
    }

    #[test]
    fn query_parameters_are_decoded() {
        let query = Some("q=red+shoes%21&user=ann&q=second");
        assert_eq!(
            query_param(query, "q").unwrap().as_deref(),
            Some("red shoes!")
        );
        assert_eq!(query_param(query, "user").unwrap().as_deref(), Some("ann"));
        assert_eq!(query_param(query, "none").unwrap(), None);
        assert_eq!(query_param(Some("q=%zz"), "q").unwrap_err().field, "q");
        assert_eq!(
            query_param(Some("q=%e2%82%ac"), "q").unwrap().as_deref(),
            Some("€")
        );
    }
}
