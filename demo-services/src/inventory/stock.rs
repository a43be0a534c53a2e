//! Inventory's books: units available and reserved per product, and what each order
//! holds. A reservation takes every line of an order or none; releasing gives it all
//! back. Pure arithmetic, no I/O, so the rules are tested here directly.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::catalog::PRODUCTS;

/// More than any basket holds; a bigger line is a client bug.
pub const MAX_LINE_QUANTITY: u32 = 1_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Line {
    pub product_id: String,
    pub quantity: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Level {
    pub available: u32,
    pub reserved: u32,
    /// Where a delivery brings `available` back to once it runs low.
    #[serde(skip)]
    restock_to: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReserveError {
    #[error("order_id: must not be empty")]
    NoOrderId,
    #[error("items: must not be empty")]
    NoItems,
    #[error("items[{index}].quantity: must be from 1 to {MAX_LINE_QUANTITY}, got {quantity}")]
    BadQuantity { index: usize, quantity: u32 },
    #[error("items[{index}].product_id: no product {product_id:?}")]
    UnknownProduct { index: usize, product_id: String },
    #[error("{product_id}: {requested} requested, {available} available")]
    Insufficient {
        product_id: String,
        requested: u32,
        available: u32,
    },
    #[error("order {order_id:?} already holds a different reservation")]
    Conflict { order_id: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserved {
    /// Booked now.
    New,
    /// The order already held exactly this: a repeated request (a retry) books once.
    Repeat,
}

#[derive(Debug, Clone)]
pub struct StockBook {
    levels: BTreeMap<String, Level>,
    reservations: BTreeMap<String, Vec<Line>>,
}

impl StockBook {
    /// Every catalog product at its initial stock, nothing reserved.
    pub fn seeded() -> Self {
        Self::with_stock(PRODUCTS.iter().map(|p| (p.id, p.initial_stock)))
    }

    pub fn with_stock<'a>(stock: impl IntoIterator<Item = (&'a str, u32)>) -> Self {
        let levels = stock
            .into_iter()
            .map(|(id, units)| {
                let level = Level {
                    available: units,
                    reserved: 0,
                    restock_to: units,
                };
                (id.to_string(), level)
            })
            .collect();
        Self {
            levels,
            reservations: BTreeMap::new(),
        }
    }

    /// Holds `lines` for `order_id`, all or nothing. Lines naming the same product are
    /// added up first, so two small lines cannot together take more than there is.
    /// Returns the products a delivery restocked because they ran low.
    pub fn reserve(
        &mut self,
        order_id: &str,
        lines: &[Line],
    ) -> Result<(Reserved, Vec<String>), ReserveError> {
        if order_id.trim().is_empty() {
            return Err(ReserveError::NoOrderId);
        }
        if lines.is_empty() {
            return Err(ReserveError::NoItems);
        }
        let mut wanted: BTreeMap<&str, u32> = BTreeMap::new();
        for (index, line) in lines.iter().enumerate() {
            if !(1..=MAX_LINE_QUANTITY).contains(&line.quantity) {
                return Err(ReserveError::BadQuantity {
                    index,
                    quantity: line.quantity,
                });
            }
            if !self.levels.contains_key(&line.product_id) {
                return Err(ReserveError::UnknownProduct {
                    index,
                    product_id: line.product_id.clone(),
                });
            }
            *wanted.entry(&line.product_id).or_default() += line.quantity;
        }
        let merged: Vec<Line> = wanted
            .iter()
            .map(|(id, quantity)| Line {
                product_id: (*id).to_string(),
                quantity: *quantity,
            })
            .collect();
        if let Some(held) = self.reservations.get(order_id) {
            return if *held == merged {
                Ok((Reserved::Repeat, Vec::new()))
            } else {
                Err(ReserveError::Conflict {
                    order_id: order_id.to_string(),
                })
            };
        }
        for line in &merged {
            let available = self.levels[&line.product_id].available;
            if line.quantity > available {
                return Err(ReserveError::Insufficient {
                    product_id: line.product_id.clone(),
                    requested: line.quantity,
                    available,
                });
            }
        }
        let mut restocked = Vec::new();
        for line in &merged {
            if let Some(level) = self.levels.get_mut(&line.product_id) {
                level.available -= line.quantity;
                level.reserved += line.quantity;
                // A supplier delivery, so a long demo never sells out: below a tenth of
                // the usual stock, the shelf is filled up again.
                if level.available < level.restock_to / 10 {
                    level.available = level.restock_to;
                    restocked.push(line.product_id.clone());
                }
            }
        }
        self.reservations.insert(order_id.to_string(), merged);
        Ok((Reserved::New, restocked))
    }

    /// Gives back what `order_id` holds; `false` when it holds nothing (released
    /// already, or never reserved), which is not an error: compensation may repeat.
    pub fn release(&mut self, order_id: &str) -> bool {
        let Some(lines) = self.reservations.remove(order_id) else {
            return false;
        };
        for line in lines {
            if let Some(level) = self.levels.get_mut(&line.product_id) {
                level.available = level.available.saturating_add(line.quantity);
                level.reserved = level.reserved.saturating_sub(line.quantity);
            }
        }
        true
    }

    pub fn levels(&self) -> &BTreeMap<String, Level> {
        &self.levels
    }

    pub fn reservations(&self) -> &BTreeMap<String, Vec<Line>> {
        &self.reservations
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(product_id: &str, quantity: u32) -> Line {
        Line {
            product_id: product_id.into(),
            quantity,
        }
    }

    fn book() -> StockBook {
        StockBook::with_stock([("a", 100), ("b", 100)])
    }

    fn level(book: &StockBook, id: &str) -> (u32, u32) {
        let level = book.levels()[id];
        (level.available, level.reserved)
    }

    #[test]
    fn reserving_moves_units_and_releasing_moves_them_back() {
        let mut book = book();
        let (reserved, _) = book.reserve("o1", &[line("a", 5), line("b", 3)]).unwrap();
        assert_eq!(reserved, Reserved::New);
        assert_eq!(level(&book, "a"), (95, 5));
        assert_eq!(level(&book, "b"), (97, 3));
        assert!(book.release("o1"));
        assert_eq!(level(&book, "a"), (100, 0));
        assert_eq!(level(&book, "b"), (100, 0));
        assert!(book.reservations().is_empty());
        assert!(!book.release("o1"), "a second release gives back nothing");
        assert_eq!(level(&book, "a"), (100, 0));
    }

    #[test]
    fn a_short_line_books_nothing_at_all() {
        let mut book = book();
        book.reserve("o1", &[line("b", 90)]).unwrap();
        let error = book
            .reserve("o2", &[line("a", 10), line("b", 11)])
            .unwrap_err();
        assert_eq!(
            error,
            ReserveError::Insufficient {
                product_id: "b".into(),
                requested: 11,
                available: 10
            }
        );
        assert_eq!(level(&book, "a"), (100, 0), "line a was not kept");
        assert!(!book.reservations().contains_key("o2"));
    }

    #[test]
    fn lines_of_one_product_are_added_up() {
        let mut book = book();
        book.reserve("o1", &[line("a", 60)]).unwrap();
        let error = book.reserve("o2", &[line("a", 30), line("a", 30)]);
        assert!(matches!(
            error,
            Err(ReserveError::Insufficient { requested: 60, .. })
        ));
        book.reserve("o3", &[line("a", 20), line("a", 20)]).unwrap();
        assert_eq!(book.reservations()["o3"], vec![line("a", 40)]);
    }

    #[test]
    fn a_repeated_reservation_books_once() {
        let mut book = book();
        book.reserve("o1", &[line("a", 2), line("b", 1)]).unwrap();
        let (again, _) = book.reserve("o1", &[line("b", 1), line("a", 2)]).unwrap();
        assert_eq!(again, Reserved::Repeat);
        assert_eq!(level(&book, "a"), (98, 2));
        let changed = book.reserve("o1", &[line("a", 3)]).unwrap_err();
        assert!(matches!(changed, ReserveError::Conflict { .. }));
    }

    #[test]
    fn bad_lines_are_refused_by_position() {
        let mut book = book();
        let error = book
            .reserve("o1", &[line("a", 1), line("zz", 1)])
            .unwrap_err();
        assert_eq!(error.to_string(), "items[1].product_id: no product \"zz\"");
        let error = book.reserve("o1", &[line("a", 0)]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "items[0].quantity: must be from 1 to 1000, got 0"
        );
        assert_eq!(
            book.reserve(" ", &[line("a", 1)]).unwrap_err(),
            ReserveError::NoOrderId
        );
        assert_eq!(book.reserve("o1", &[]).unwrap_err(), ReserveError::NoItems);
        assert_eq!(level(&book, "a"), (100, 0));
    }

    #[test]
    fn running_low_brings_a_delivery() {
        let mut book = book();
        let (_, restocked) = book.reserve("o1", &[line("a", 90)]).unwrap();
        assert!(restocked.is_empty(), "10 left is not below a tenth");
        let (_, restocked) = book.reserve("o2", &[line("a", 1)]).unwrap();
        assert_eq!(restocked, vec!["a".to_string()]);
        assert_eq!(level(&book, "a"), (100, 91));
        assert!(book.release("o1"));
        assert_eq!(level(&book, "a"), (190, 1));
    }
}
