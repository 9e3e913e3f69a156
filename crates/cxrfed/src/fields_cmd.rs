//! `cxrfed field define|list` and `cxrfed annotate set|import`: custom fields and human labels
//! (site admin).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use cxrfed_proto::v1 as pb;

use crate::client::{Credentials, status_error};

#[derive(Debug, Args)]
pub struct Target {
    /// Node URL [default: the profile's node, else https://127.0.0.1:50051].
    #[arg(long, env = "CXRFED_NODE")]
    node: Option<String>,
    #[command(flatten)]
    credentials: Credentials,
}

impl Target {
    async fn connect(
        &self,
    ) -> anyhow::Result<
        cxrfed_proto::v1::node_service_client::NodeServiceClient<tonic::transport::Channel>,
    > {
        self.credentials.connect_node(self.node.as_deref()).await
    }
}

#[derive(Debug, Subcommand)]
pub enum FieldCommand {
    /// Define a custom field (again: a new version).
    Define {
        /// snake_case name, e.g. pneumothorax.
        name: String,
        /// bool, categorical or numeric.
        #[arg(long = "type")]
        kind: String,
        /// Categories of a categorical field, comma-separated.
        #[arg(long, value_delimiter = ',')]
        values: Vec<String>,
        #[arg(long, allow_negative_numbers = true)]
        min: Option<f64>,
        #[arg(long, allow_negative_numbers = true)]
        max: Option<f64>,
        #[arg(long, default_value = "")]
        description: String,
        /// A phrase `ask` maps to this field (repeatable; any language).
        #[arg(long = "synonym")]
        synonyms: Vec<String>,
        #[command(flatten)]
        target: Target,
    },
    /// List the custom fields.
    List {
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Debug, Subcommand)]
pub enum AnnotateCommand {
    /// Label one field of one record.
    Set {
        record_id: String,
        field: String,
        value: String,
        /// Who labelled it [default: your certificate's identity].
        #[arg(long)]
        annotator: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Import labels from a CSV keyed by image_sha256 (or record_id): every column named
    /// after a schema finding or a custom field is imported; the phantom labels.csv works as is.
    Import {
        file: PathBuf,
        #[arg(long)]
        annotator: Option<String>,
        #[command(flatten)]
        target: Target,
    },
}

pub async fn field(command: FieldCommand) -> anyhow::Result<ExitCode> {
    match command {
        FieldCommand::Define {
            name,
            kind,
            values,
            min,
            max,
            description,
            synonyms,
            target,
        } => {
            let mut client = target.connect().await?;
            let defined = client
                .define_field(pb::DefineFieldRequest {
                    field: Some(pb::FieldDefinition {
                        name,
                        r#type: kind,
                        values,
                        min: min.unwrap_or(0.0),
                        max: max.unwrap_or(0.0),
                        description,
                        synonyms,
                        ..Default::default()
                    }),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("defined {} (version {})", defined.name, defined.version);
        }
        FieldCommand::List { target } => {
            let mut client = target.connect().await?;
            let fields = client
                .list_fields(pb::ListFieldsRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .fields;
            for f in fields {
                let kind = match f.r#type.as_str() {
                    "categorical" => format!("categorical({})", f.values.join(", ")),
                    "numeric" => format!("numeric({}..={})", f.min, f.max),
                    other => other.to_string(),
                };
                println!("{}  v{}  {kind}  {}", f.name, f.version, f.description);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn annotate(command: AnnotateCommand) -> anyhow::Result<ExitCode> {
    match command {
        AnnotateCommand::Set {
            record_id,
            field,
            value,
            annotator,
            target,
        } => {
            let mut client = target.connect().await?;
            let response = client
                .annotate(pb::AnnotateRequest {
                    record_id,
                    field,
                    value,
                    annotator: annotator.unwrap_or_default(),
                    ..Default::default()
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let a = response.annotation.unwrap_or_default();
            println!(
                "{} {} = {} (by {})",
                response.record_id, a.field, a.value, a.annotator
            );
            Ok(ExitCode::SUCCESS)
        }
        AnnotateCommand::Import {
            file,
            annotator,
            target,
        } => {
            let mut client = target.connect().await?;
            let custom: Vec<String> = client
                .list_fields(pb::ListFieldsRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .fields
                .into_iter()
                .map(|f| f.name)
                .collect();
            let mut reader = csv::Reader::from_path(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let header: Vec<String> = reader.headers()?.iter().map(str::to_string).collect();
            let key = ["image_sha256", "record_id"]
                .into_iter()
                .find_map(|k| header.iter().position(|h| h == k).map(|i| (k, i)));
            let Some((key_name, key_index)) = key else {
                bail!("{} has no image_sha256 or record_id column", file.display());
            };
            let annotatable = |name: &str| {
                custom.iter().any(|c| c == name)
                    || cxrfed_schema::flat::field(name).is_some_and(|f| f.probability.is_some())
            };
            let columns: Vec<(usize, &String)> = header
                .iter()
                .enumerate()
                .filter(|(i, name)| *i != key_index && annotatable(name))
                .collect();
            let ignored: Vec<&str> = header
                .iter()
                .enumerate()
                .filter(|(i, name)| *i != key_index && !annotatable(name))
                .map(|(_, n)| n.as_str())
                .collect();
            if !ignored.is_empty() {
                eprintln!(
                    "ignoring columns that are not annotatable fields: {}",
                    ignored.join(", ")
                );
            }
            let (mut stored, mut rows, mut unknown, mut refused) = (0u64, 0u64, 0u64, 0u64);
            for row in reader.records() {
                let row = row?;
                rows += 1;
                let id = row.get(key_index).unwrap_or("").to_string();
                for (i, field) in &columns {
                    let value = row.get(*i).unwrap_or("").trim();
                    if value.is_empty() {
                        continue;
                    }
                    let mut request = pb::AnnotateRequest {
                        field: (*field).clone(),
                        value: value.to_string(),
                        annotator: annotator.clone().unwrap_or_default(),
                        ..Default::default()
                    };
                    if key_name == "image_sha256" {
                        request.image_sha256 = id.clone();
                    } else {
                        request.record_id = id.clone();
                    }
                    match client.annotate(request).await {
                        Ok(_) => stored += 1,
                        Err(status) if status.code() == tonic::Code::NotFound => {
                            unknown += 1;
                            break;
                        }
                        Err(status) if status.code() == tonic::Code::InvalidArgument => {
                            refused += 1;
                            if refused <= 5 {
                                eprintln!("row {rows}, {field}: {}", status.message());
                            }
                        }
                        Err(status) => return Err(status_error(status)),
                    }
                }
            }
            println!(
                "imported {stored} labels from {rows} rows ({} fields); {unknown} rows name images the node does not have; {refused} values refused",
                columns.len()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
