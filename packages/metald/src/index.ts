export { metald } from "./definition.js";
