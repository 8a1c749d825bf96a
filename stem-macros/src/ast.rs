//! The function as the user wrote it, classified: which parameters are the
//! payload and which are injected, and what the output is. Every node keeps
//! the user's tokens, so errors and assertions land on them.

use proc_macro2::TokenStream;
use syn::{FnArg, GenericArgument, Ident, ItemFn, Pat, PathArguments, ReturnType, Type};

use crate::check::Errors;

/// The annotated function.
pub(crate) struct TaskFn {
    /// The function, emitted unchanged.
    pub(crate) item: ItemFn,
    /// Its parameters, in order (a `self` receiver is not among them).
    pub(crate) params: Vec<Param>,
    /// Its output.
    pub(crate) output: Output,
}

/// What a parameter is for.
pub(crate) enum ParamKind {
    /// Serialized into `Args`.
    Payload,
    /// `stem::Context`, injected.
    Context,
    /// `stem::State<T>`, injected; holds `T`.
    State(Box<Type>),
}

/// One parameter.
pub(crate) struct Param {
    /// The binding, when the pattern is a plain identifier.
    pub(crate) ident: Option<Ident>,
    /// The pattern as written.
    pub(crate) pat: Pat,
    /// The type as written.
    pub(crate) ty: Type,
    /// Payload or injected.
    pub(crate) kind: ParamKind,
}

/// The function's output.
pub(crate) enum Output {
    /// No `->` (or `-> ()`).
    Unit,
    /// `-> T`.
    Plain(Box<Type>),
    /// `-> Result<T, E>`.
    Result {
        /// `T`.
        ok: Box<Type>,
        /// `E`.
        err: Box<Type>,
    },
}

impl Output {
    /// The task's `Output` type (`T` of `Result<T, E>`).
    pub(crate) fn value_type(&self) -> TokenStream {
        match self {
            Self::Unit => quote::quote!(()),
            Self::Plain(t) | Self::Result { ok: t, .. } => quote::quote!(#t),
        }
    }
}

impl TaskFn {
    /// Parses the item; `None` (with an error recorded) when it is not a function.
    pub(crate) fn parse(item: TokenStream, errors: &mut Errors) -> Option<Self> {
        let item: ItemFn = match syn::parse2(item) {
            Ok(f) => f,
            Err(e) => {
                errors.push_error(syn::Error::new(
                    e.span(),
                    format!("#[stem::task] goes on an `async fn`: {e}"),
                ));
                return None;
            }
        };
        let params = item
            .sig
            .inputs
            .iter()
            .filter_map(|arg| match arg {
                FnArg::Receiver(_) => None,
                FnArg::Typed(pt) => Some(Param {
                    ident: match &*pt.pat {
                        Pat::Ident(pi) if pi.by_ref.is_none() && pi.subpat.is_none() => {
                            Some(pi.ident.clone())
                        }
                        _ => None,
                    },
                    pat: (*pt.pat).clone(),
                    ty: (*pt.ty).clone(),
                    kind: classify(&pt.ty),
                }),
            })
            .collect();
        let output = match &item.sig.output {
            ReturnType::Default => Output::Unit,
            ReturnType::Type(_, ty) => match &**ty {
                Type::Tuple(t) if t.elems.is_empty() => Output::Unit,
                ty => match result_args(ty) {
                    Some((ok, err)) => Output::Result { ok, err },
                    None => Output::Plain(Box::new(ty.clone())),
                },
            },
        };
        Some(Self {
            item,
            params,
            output,
        })
    }

    /// The function's name.
    pub(crate) fn ident(&self) -> &Ident {
        &self.item.sig.ident
    }

    /// The payload parameters.
    pub(crate) fn payload(&self) -> impl Iterator<Item = &Param> {
        self.params
            .iter()
            .filter(|p| matches!(p.kind, ParamKind::Payload))
    }
}

/// The last path segment of a plain path type.
pub(crate) fn last_segment(ty: &Type) -> Option<&syn::PathSegment> {
    match ty {
        Type::Path(p) if p.qself.is_none() => p.path.segments.last(),
        Type::Group(g) => last_segment(&g.elem),
        Type::Paren(p) => last_segment(&p.elem),
        _ => None,
    }
}

/// The type arguments of a segment (`Foo<A, B>` -> `[A, B]`).
pub(crate) fn type_args(seg: &syn::PathSegment) -> Vec<&Type> {
    match &seg.arguments {
        PathArguments::AngleBracketed(a) => a
            .args
            .iter()
            .filter_map(|g| match g {
                GenericArgument::Type(t) => Some(t),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Injected parameters are recognised by their type's last segment:
/// `Context` and `State<T>`.
fn classify(ty: &Type) -> ParamKind {
    let Some(seg) = last_segment(ty) else {
        return ParamKind::Payload;
    };
    if seg.ident == "Context" && seg.arguments.is_none() {
        return ParamKind::Context;
    }
    if seg.ident == "State"
        && let [inner] = type_args(seg).as_slice()
    {
        return ParamKind::State(Box::new((*inner).clone()));
    }
    ParamKind::Payload
}

/// `Result<T, E>` -> `(T, E)`.
fn result_args(ty: &Type) -> Option<(Box<Type>, Box<Type>)> {
    let seg = last_segment(ty)?;
    if seg.ident != "Result" {
        return None;
    }
    match type_args(seg).as_slice() {
        [ok, err] => Some((Box::new((*ok).clone()), Box::new((*err).clone()))),
        _ => None,
    }
}
