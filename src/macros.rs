//! Macros shared by the configurable types.

/// Chained setters of an unchecked params type: for each listed field,
/// `pub fn field(mut self, field: Type) -> Self`, documented by the doc
/// comment written above it. A setter stores the value as given and cannot
/// fail: the type validates every setting once, where the settings are used
/// (`check()`, and `build()` or the fit that calls it).
///
/// ```ignore
/// impl WidgetParams {
///     setters! {
///         /// Width in pixels (≥ 1).
///         width: u32;
///     }
/// }
/// ```
macro_rules! setters {
    ($($(#[$attr:meta])* $field:ident: $ty:ty;)+) => {
        $(
            $(#[$attr])*
            pub fn $field(mut self, $field: $ty) -> Self {
                self.$field = $field;
                self
            }
        )+
    };
}
