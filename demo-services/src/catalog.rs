//! The marketplace's seed data: the same twelve products with the same prices in
//! every process, so services that each own a copy (storefront's catalog, order's
//! price list, inventory's stock) agree without asking one another.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Product {
    pub id: &'static str,
    pub name: &'static str,
    pub category: &'static str,
    pub price_cents: u64,
    /// Units inventory starts with (and restocks to).
    #[serde(skip)]
    pub initial_stock: u32,
}

const fn product(
    id: &'static str,
    name: &'static str,
    category: &'static str,
    price_cents: u64,
    initial_stock: u32,
) -> Product {
    Product {
        id,
        name,
        category,
        price_cents,
        initial_stock,
    }
}

/// In bestseller order: recommendations v1 reads the first few.
pub const PRODUCTS: &[Product] = &[
    product("p-01", "Trail Running Shoes", "footwear", 8_999, 1_200),
    product("p-02", "Merino Wool Socks", "footwear", 1_499, 5_000),
    product("p-03", "Insulated Water Bottle", "outdoor", 2_499, 3_000),
    product("p-04", "Ultralight Rain Jacket", "apparel", 12_900, 800),
    product("p-05", "Headlamp 400lm", "outdoor", 3_450, 2_000),
    product("p-06", "Canvas Weekender Bag", "bags", 7_900, 600),
    product("p-07", "Espresso Hand Grinder", "kitchen", 6_499, 900),
    product("p-08", "Pour-Over Coffee Set", "kitchen", 3_999, 1_500),
    product(
        "p-09",
        "Noise-Cancelling Earbuds",
        "electronics",
        14_999,
        700,
    ),
    product("p-10", "Solar Power Bank", "electronics", 4_999, 1_000),
    product("p-11", "Linen Button-Down Shirt", "apparel", 5_900, 1_100),
    product("p-12", "Packable Daypack", "bags", 2_999, 2_500),
];

pub fn find(id: &str) -> Option<&'static Product> {
    PRODUCTS.iter().find(|p| p.id == id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_prices_positive() {
        let mut ids: Vec<_> = PRODUCTS.iter().map(|p| p.id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), PRODUCTS.len());
        assert!(
            PRODUCTS
                .iter()
                .all(|p| p.price_cents > 0 && p.initial_stock > 0)
        );
        assert_eq!(find("p-07").map(|p| p.price_cents), Some(6_499));
        assert_eq!(find("p-99"), None);
    }
}
