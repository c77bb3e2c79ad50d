//! The vaccine catalogue and the lots a node knows about.
//!
//! The catalogue is data, not code: each node loads it from a file its operator can edit
//! (`node` ships a default). A product is found by the GTIN printed on the vial.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::Date;

use crate::gs1::Gtin;

/// One vaccine product as it appears on a vial's GS1 barcode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Product {
    /// The GTIN-14 on the vial.
    pub gtin: Gtin,
    /// Short stable code used in records and statistics, e.g. `comirnaty-30`.
    pub code: String,
    /// Product name in Japanese, as staff know it.
    pub name_ja: String,
    /// Product name in English.
    pub name_en: String,
    /// Marketing authorisation holder.
    pub maker: String,
    /// Doses in the primary series.
    pub doses_in_series: u8,
    /// Minimum days since the previous dose, for dose 2, 3, …; the last value applies to
    /// every later dose.
    pub min_interval_days: Vec<u16>,
    /// Minimum age in full years on the day of vaccination.
    pub min_age_years: u8,
}

impl Product {
    /// The minimum number of days between dose `dose_number - 1` and `dose_number`.
    pub fn min_interval_before(&self, dose_number: u8) -> u16 {
        if dose_number < 2 {
            return 0;
        }
        let index = usize::from(dose_number - 2);
        self.min_interval_days.get(index).or(self.min_interval_days.last()).copied().unwrap_or(0)
    }
}

/// Every product a node accepts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalogue {
    /// The products, in the order the operator listed them.
    #[serde(rename = "product")]
    pub products: Vec<Product>,
}

/// What is wrong with a catalogue file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CatalogueError {
    /// Two products share a GTIN.
    #[error("product {index}: GTIN {gtin} is listed twice")]
    DuplicateGtin {
        /// 1-based position of the second product.
        index: usize,
        /// The repeated GTIN.
        gtin: Gtin,
    },
    /// Two products share a code.
    #[error("product {index}: code {code:?} is listed twice")]
    DuplicateCode {
        /// 1-based position of the second product.
        index: usize,
        /// The repeated code.
        code: String,
    },
    /// A product has no doses.
    #[error("product {index}: doses_in_series must be at least 1")]
    NoDoses {
        /// 1-based position of the product.
        index: usize,
    },
    /// The catalogue is empty.
    #[error("the catalogue lists no product")]
    Empty,
}

impl Catalogue {
    /// Checks the catalogue's own consistency.
    pub fn validate(&self) -> Result<(), CatalogueError> {
        if self.products.is_empty() {
            return Err(CatalogueError::Empty);
        }
        let mut gtins = BTreeMap::new();
        let mut codes = BTreeMap::new();
        for (i, product) in self.products.iter().enumerate() {
            let index = i + 1;
            if gtins.insert(product.gtin.to_string(), index).is_some() {
                return Err(CatalogueError::DuplicateGtin { index, gtin: product.gtin.clone() });
            }
            if codes.insert(product.code.clone(), index).is_some() {
                return Err(CatalogueError::DuplicateCode { index, code: product.code.clone() });
            }
            if product.doses_in_series == 0 {
                return Err(CatalogueError::NoDoses { index });
            }
        }
        Ok(())
    }

    /// The product with this GTIN.
    pub fn product(&self, gtin: &Gtin) -> Option<&Product> {
        self.products.iter().find(|p| &p.gtin == gtin)
    }

    /// The youngest age any product may be given at: who is eligible for a coupon.
    pub fn min_eligible_age(&self) -> u8 {
        self.products.iter().map(|p| p.min_age_years).min().unwrap_or(0)
    }
}

/// A lot (製造番号) a node has received, from a delivery note or the maker's list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lot {
    /// The lot number as printed in AI (10).
    pub lot: String,
    /// The product the lot belongs to.
    pub gtin: Gtin,
    /// The last day the lot may be used.
    pub expiry: Date,
}
