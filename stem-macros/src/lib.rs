//! The `#[stem::task]` attribute macro. Use it through the `stem` crate,
//! which documents what the macro generates.
//!
//! The macro runs in three steps, one file each:
//!
//! - [`ast`] and [`attr`] parse what the user wrote, keeping every span,
//! - [`check`] validates it, collecting every error at once,
//! - [`expand`] generates the task module (or, when there were errors, a
//!   stub module with the same items so call sites stay quiet).

mod ast;
mod attr;
mod check;
mod expand;
// Shared with stem-core, where these items are public API.
#[allow(unreachable_pub)]
mod rules;

use proc_macro::TokenStream;

/// Turns an `async fn` into a Stem task: keeps the function and generates a
/// module of the same name with `NAME`, `Args`, `Output`, `Task`,
/// `OPTIONS`, `enqueue`, `enqueue_on`, `with`, `enqueue_many`, `signature`,
/// and registers the handler with the worker registry.
///
/// See the `stem` crate's documentation for the attribute keys.
#[proc_macro_attribute]
pub fn task(attr: TokenStream, item: TokenStream) -> TokenStream {
    let item = proc_macro2::TokenStream::from(item);
    let mut errors = check::Errors::default();
    let args = attr::parse(attr.into(), &mut errors);
    let Some(func) = ast::TaskFn::parse(item.clone(), &mut errors) else {
        // Not a function at all: give the item back untouched with the error.
        let compile_errors = errors.into_compile_errors();
        return quote::quote!(#item #compile_errors).into();
    };
    let options = attr::Options::from_args(&args, &mut errors);
    let plan = check::check(&func, &options, &mut errors);
    let compile_errors = errors.into_compile_errors();
    expand::expand(&func, &options, &plan, compile_errors).into()
}
