//! Plain-text tables as `kubectl` prints them: upper-case headers, columns padded to
//! their widest cell and three spaces apart, no trailing spaces.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: Vec<&'static str>) -> Self {
        Self {
            headers,
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells print empty, extra cells are dropped.
    pub fn push(&mut self, mut row: Vec<String>) {
        row.resize(self.headers.len(), String::new());
        self.rows.push(row);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let headers = self.headers.iter().map(|h| h.to_string()).collect();
        for row in std::iter::once(&headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
                if i > 0 {
                    line.push_str("   ");
                }
                line.push_str(cell);
                let pad = width.saturating_sub(cell.chars().count());
                line.extend(std::iter::repeat_n(' ', pad));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_on_the_widest_cell() {
        let mut table = Table::new(vec!["NAME", "SERVICE", "RULES"]);
        table.push(vec!["payment".into(), "pay".into(), "3".into()]);
        table.push(vec!["web".into(), "web-frontend".into()]);
        assert_eq!(
            table.render(),
            "NAME      SERVICE        RULES\n\
             payment   pay            3\n\
             web       web-frontend\n"
        );
    }

    #[test]
    fn an_empty_table_is_its_header() {
        let table = Table::new(vec!["A", "B"]);
        assert!(table.is_empty());
        assert_eq!(table.render(), "A   B\n");
    }
}
