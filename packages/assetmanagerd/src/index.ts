export { assetmanagerd } from "./definition.js";
