export { gatewayd } from "./definition.js";
