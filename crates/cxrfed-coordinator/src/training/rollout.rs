//! Weights down a link (a round's global model, a promoted version), and promotion.

use cxrfed_proto::v1 as pb;

use super::Trainer;
use super::docs::ModelDoc;
use super::registry::now;
use crate::error::{CoordinatorError, Result};
use crate::links::Outbound;

/// Sends a task (training or rollout) and then its weights in [`cxrfed_proto::CHUNK_BYTES`]
/// chunks, slices of one shared buffer. A closed link ends the transfer; the round's deadline
/// deals with the rest.
pub(super) async fn stream_weights(
    link: Outbound,
    head: pb::coordinator_message::Kind,
    weights: prost::bytes::Bytes,
) {
    let task_id = match &head {
        pb::coordinator_message::Kind::Train(t) => t.task_id.clone(),
        pb::coordinator_message::Kind::Rollout(r) => r.rollout_id.clone(),
        _ => return,
    };
    let send = |kind| pb::CoordinatorMessage { kind: Some(kind) };
    if link.send(Ok(send(head))).await.is_err() {
        return;
    }
    for chunk in cxrfed_proto::chunks(&task_id, weights) {
        if link
            .send(Ok(send(pb::coordinator_message::Kind::Weights(chunk))))
            .await
            .is_err()
        {
            return;
        }
    }
}

impl Trainer {
    /// Sends a model to one site's link, with the signed order that promoted it.
    pub fn rollout_to(&self, link: Outbound, doc: &ModelDoc) -> Result<()> {
        let weights = prost::bytes::Bytes::from(self.registry.get_blob(&doc.sha256)?);
        let rollout = pb::ModelRollout {
            rollout_id: format!("rollout/{}/{}", doc.version, uuid::Uuid::new_v4().simple()),
            version: doc.version.clone(),
            card_json: serde_json::to_string(&doc.card).map_err(CoordinatorError::internal)?,
            weights_sha256: doc.sha256.clone(),
            weights_bytes: weights.len() as u64,
            order: Some(doc.promotion.signed()),
        };
        tokio::spawn(stream_weights(
            link,
            pb::coordinator_message::Kind::Rollout(rollout),
            weights,
        ));
        Ok(())
    }

    /// Promotes a version under the study admin's verified order: recorded in the registry
    /// with the order, then sent to every connected site (sites that connect later get it on
    /// their hello). Each node verifies the order again before installing.
    pub async fn promote(
        &self,
        order: &pb::Order,
        signed: &pb::SignedOrder,
    ) -> Result<(ModelDoc, Vec<String>)> {
        let version = order.model_version.as_str();
        let mut doc = self.registry.require_model(version)?;
        if doc.sha256 != order.model_sha256 {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "the order promotes weights {}, the registry's {version} has {}",
                order.model_sha256, doc.sha256
            )));
        }
        self.registry
            .get_blob(&doc.sha256)
            .map_err(CoordinatorError::precondition)?;
        doc.promoted_at = now();
        doc.promotion = super::docs::SignedOrderDoc::of(signed);
        self.registry.save_model(&doc).await?;
        let mut sent = Vec::new();
        for (site, link) in self.links.connected_sorted() {
            self.rollout_to(link, &doc)?;
            sent.push(site);
        }
        tracing::info!(version, sites = sent.len(), "model promoted");
        Ok((doc, sent))
    }
}
