//! Shopping carts, one per user, kept by the storefront: product and quantity per
//! line, priced from the catalog when shown.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{catalog, input::InputError};

/// Most units of one product a cart holds.
pub const MAX_LINE_QUANTITY: u64 = 100;
/// Carts kept at most; past it new users get an error, not unbounded memory.
pub const MAX_CARTS: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CartLine {
    pub product_id: String,
    pub name: &'static str,
    pub quantity: u64,
    pub price_cents: u64,
    pub line_total_cents: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CartView {
    pub user: String,
    pub items: Vec<CartLine>,
    pub total_cents: u64,
}

#[derive(Debug, Default)]
pub struct Carts {
    /// user → product id → quantity.
    carts: BTreeMap<String, BTreeMap<&'static str, u64>>,
}

impl Carts {
    /// Adds `quantity` of `product_id` to `user`'s cart, on top of what is there.
    pub fn add(&mut self, user: &str, product_id: &str, quantity: u64) -> Result<(), InputError> {
        let product = catalog::find(product_id)
            .ok_or_else(|| InputError::new("productId", format!("no product {product_id:?}")))?;
        if !(1..=MAX_LINE_QUANTITY).contains(&quantity) {
            return Err(InputError::new(
                "quantity",
                format!("expected a whole number from 1 to {MAX_LINE_QUANTITY}, got {quantity}"),
            ));
        }
        if !self.carts.contains_key(user) && self.carts.len() >= MAX_CARTS {
            return Err(InputError::new(
                "user",
                format!("{MAX_CARTS} carts are open already; no room for {user:?}"),
            ));
        }
        let cart = self.carts.entry(user.to_string()).or_default();
        let held = cart.get(product.id).copied().unwrap_or(0);
        if held + quantity > MAX_LINE_QUANTITY {
            return Err(InputError::new(
                "quantity",
                format!(
                    "the cart holds {held} of {} already; {quantity} more is over {MAX_LINE_QUANTITY}",
                    product.id
                ),
            ));
        }
        cart.insert(product.id, held + quantity);
        Ok(())
    }

    /// `(product id, quantity)` per line of `user`'s cart; empty when there is none.
    pub fn lines(&self, user: &str) -> Vec<(&'static str, u64)> {
        self.carts
            .get(user)
            .map(|cart| cart.iter().map(|(id, q)| (*id, *q)).collect())
            .unwrap_or_default()
    }

    /// Takes out what an order bought. Only that: a line added while the checkout was
    /// under way stays in the cart.
    pub fn remove_ordered(&mut self, user: &str, ordered: &[(&'static str, u64)]) {
        let Some(cart) = self.carts.get_mut(user) else {
            return;
        };
        for (product_id, quantity) in ordered {
            if let Some(held) = cart.get_mut(product_id) {
                *held = held.saturating_sub(*quantity);
                if *held == 0 {
                    cart.remove(product_id);
                }
            }
        }
        if cart.is_empty() {
            self.carts.remove(user);
        }
    }

    pub fn view(&self, user: &str) -> CartView {
        let items: Vec<CartLine> = self
            .lines(user)
            .into_iter()
            .filter_map(|(id, quantity)| {
                let product = catalog::find(id)?;
                Some(CartLine {
                    product_id: id.to_string(),
                    name: product.name,
                    quantity,
                    price_cents: product.price_cents,
                    line_total_cents: product.price_cents * quantity,
                })
            })
            .collect();
        CartView {
            user: user.to_string(),
            total_cents: items.iter().map(|line| line.line_total_cents).sum(),
            items,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adding_sums_quantities_and_prices_lines() {
        let mut carts = Carts::default();
        carts.add("ann", "p-02", 2).unwrap();
        carts.add("ann", "p-02", 1).unwrap();
        carts.add("ann", "p-05", 1).unwrap();
        let view = carts.view("ann");
        assert_eq!(view.items.len(), 2);
        assert_eq!(view.items[0].quantity, 3);
        assert_eq!(view.items[0].line_total_cents, 3 * 1_499);
        assert_eq!(view.total_cents, 3 * 1_499 + 3_450);
        assert!(carts.view("bob").items.is_empty());
    }

    #[test]
    fn bad_additions_change_nothing() {
        let mut carts = Carts::default();
        carts.add("ann", "p-01", 99).unwrap();
        assert_eq!(carts.add("ann", "p-01", 2).unwrap_err().field, "quantity");
        assert_eq!(carts.add("ann", "p-01", 0).unwrap_err().field, "quantity");
        assert_eq!(carts.add("ann", "nope", 1).unwrap_err().field, "productId");
        assert_eq!(carts.lines("ann"), vec![("p-01", 99)]);
    }

    #[test]
    fn checkout_removes_only_what_was_ordered() {
        let mut carts = Carts::default();
        carts.add("ann", "p-01", 2).unwrap();
        let ordered = carts.lines("ann");
        carts.add("ann", "p-01", 1).unwrap();
        carts.add("ann", "p-03", 1).unwrap();
        carts.remove_ordered("ann", &ordered);
        assert_eq!(carts.lines("ann"), vec![("p-01", 1), ("p-03", 1)]);
        let rest = carts.lines("ann");
        carts.remove_ordered("ann", &rest);
        assert!(carts.lines("ann").is_empty());
        assert!(carts.carts.is_empty(), "an emptied cart is dropped");
    }
}
